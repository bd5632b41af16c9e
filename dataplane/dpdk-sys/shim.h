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
#endif
