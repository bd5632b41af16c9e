/* See shim.h. */
#include <rte_ethdev.h>
#include <rte_errno.h>
#include <rte_mbuf.h>
#include "shim.h"
#include <setjmp.h>
#include <signal.h>
#include <string.h>

uint16_t torii_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
	return rte_eth_rx_burst(port, queue, pkts, n);
}

uint16_t torii_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
	return rte_eth_tx_burst(port, queue, pkts, n);
}

uint16_t torii_tx_prepare(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
	return rte_eth_tx_prepare(port, queue, pkts, n);
}

int torii_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **pkts, unsigned n)
{
	return rte_pktmbuf_alloc_bulk(mp, pkts, n);
}

void torii_pktmbuf_free(struct rte_mbuf *m)
{
	rte_pktmbuf_free(m);
}

int torii_errno(void)
{
	return rte_errno;
}

void torii_mbuf_set_tx_offload(struct rte_mbuf *m, uint16_t l2_len, uint16_t l3_len,
                               uint16_t l4_len, uint16_t tso_segsz)
{
	m->l2_len = l2_len;
	m->l3_len = l3_len;
	m->l4_len = l4_len;
	m->tso_segsz = tso_segsz;
}

void torii_mbuf_attach_extbuf(struct rte_mbuf *m, void *buf, uint16_t len,
                              struct rte_mbuf_ext_shared_info *shinfo)
{
	rte_pktmbuf_attach_extbuf(m, buf, RTE_BAD_IOVA, len, shinfo);
	m->data_off = 0;
	m->data_len = len;
	m->pkt_len = len;
	m->nb_segs = 1;
}

/* The guarded bursts (shim.h). The jump buffer is the thread's own and is set only for the
 * duration of a guarded burst; the handler jumps back into the burst's frame, which is live.
 * sigsetjmp does not save the signal mask (no system call per burst): the handlers run with
 * SA_NODEFER, so leaving one by a jump leaves nothing blocked. */
/* volatile, and set and cleared with compiler barriers around the guarded access: otherwise
 * the compiler sees a store nothing reads and drops it. */
static __thread sigjmp_buf *volatile torii_burst_jump;
#define TORII_BARRIER() __asm__ __volatile__("" ::: "memory")
static struct sigaction torii_prev_segv, torii_prev_bus;

static void torii_pass_on(int sig, siginfo_t *info, void *ctx)
{
	struct sigaction *prev = sig == SIGSEGV ? &torii_prev_segv : &torii_prev_bus;
	if (prev->sa_flags & SA_SIGINFO) {
		if (prev->sa_sigaction != NULL) {
			prev->sa_sigaction(sig, info, ctx);
			return;
		}
	} else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
		prev->sa_handler(sig);
		return;
	}
	/* The default action: the faulting access raises it again on return. */
	signal(sig, SIG_DFL);
}

static void torii_burst_fault(int sig, siginfo_t *info, void *ctx)
{
	sigjmp_buf *jump = torii_burst_jump;
	if (jump != NULL && info != NULL && info->si_code > 0) {
		torii_burst_jump = NULL;
		siglongjmp(*jump, 1);
	}
	torii_pass_on(sig, info, ctx);
}

int torii_burst_guard_install(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = torii_burst_fault;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGSEGV, &sa, &torii_prev_segv) != 0)
		return -1;
	if (sigaction(SIGBUS, &sa, &torii_prev_bus) != 0)
		return -1;
	return 0;
}

uint16_t torii_rx_burst_guarded(uint16_t port, uint16_t queue, struct rte_mbuf **pkts,
                                uint16_t n, int *fault)
{
	sigjmp_buf jump;
	volatile uint16_t got = 0;
	*fault = 0;
	if (sigsetjmp(jump, 0) != 0) {
		*fault = 1;
		return 0;
	}
	torii_burst_jump = &jump;
	TORII_BARRIER();
	got = rte_eth_rx_burst(port, queue, pkts, n);
	TORII_BARRIER();
	torii_burst_jump = NULL;
	return got;
}

uint16_t torii_tx_burst_guarded(uint16_t port, uint16_t queue, struct rte_mbuf **pkts,
                                uint16_t n, int *fault)
{
	sigjmp_buf jump;
	volatile uint16_t sent = 0;
	*fault = 0;
	if (sigsetjmp(jump, 0) != 0) {
		*fault = 1;
		return 0;
	}
	torii_burst_jump = &jump;
	TORII_BARRIER();
	sent = rte_eth_tx_burst(port, queue, pkts, n);
	TORII_BARRIER();
	torii_burst_jump = NULL;
	return sent;
}

uint8_t torii_guarded_read(const volatile uint8_t *p, int *fault)
{
	sigjmp_buf jump;
	volatile uint8_t v = 0;
	*fault = 0;
	if (sigsetjmp(jump, 0) != 0) {
		*fault = 1;
		return 0;
	}
	torii_burst_jump = &jump;
	TORII_BARRIER();
	v = *p;
	TORII_BARRIER();
	torii_burst_jump = NULL;
	return v;
}
