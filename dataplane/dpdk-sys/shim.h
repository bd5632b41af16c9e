/* Out-of-line copies of DPDK's static inline fast-path functions (and of thread-local state
 * bindgen cannot reach), so Rust can call them. One call per burst on the data path. */
#ifndef TORII_DPDK_SHIM_H
#define TORII_DPDK_SHIM_H
#include <stdint.h>
#include <rte_mbuf.h>

uint16_t torii_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t torii_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t torii_tx_prepare(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
/* 0 and `n` mbufs in `pkts`, or -ENOENT and none. */
int torii_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **pkts, unsigned n);
void torii_pktmbuf_free(struct rte_mbuf *m);
/* The value of rte_errno on the calling thread. */
int torii_errno(void);
/* Sets the transmit offload lengths (bit fields of rte_mbuf). */
void torii_mbuf_set_tx_offload(struct rte_mbuf *m, uint16_t l2_len, uint16_t l3_len,
                               uint16_t l4_len, uint16_t tso_segsz);
/* Attaches `buf` (`len` bytes, not DPDK memory: IOVA unknown) as the external buffer of `m`,
 * whose frame is then those `len` bytes; `shinfo` must outlive the attachment; its callback
 * runs when the last reference goes. */
void torii_mbuf_attach_extbuf(struct rte_mbuf *m, void *buf, uint16_t len,
                              struct rte_mbuf_ext_shared_info *shinfo);
/* Bursts of a driver that maps a peer's memory (memif), which the peer can take away during
 * the burst: DPDK 22.11's memif driver unmaps and frees a departing peer's regions from its
 * interrupt thread without waiting for the data path. A SIGSEGV or SIGBUS inside the burst
 * abandons it: the call returns 0 with *fault set. The driver's queue is being torn down by
 * then; mbufs it had taken for the abandoned burst are not returned (at most `n`). */
uint16_t torii_rx_burst_guarded(uint16_t port, uint16_t queue, struct rte_mbuf **pkts,
                                uint16_t n, int *fault);
uint16_t torii_tx_burst_guarded(uint16_t port, uint16_t queue, struct rte_mbuf **pkts,
                                uint16_t n, int *fault);
/* Installs the SIGSEGV and SIGBUS handlers the guarded bursts need; other faults go to the
 * handlers that were there before (or the default action). 0, or -1 with errno. */
int torii_burst_guard_install(void);
/* Reads the byte at `p` under the same guard (for tests): 0 with *fault set if it faulted. */
uint8_t torii_guarded_read(const volatile uint8_t *p, int *fault);
#endif
