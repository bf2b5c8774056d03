/* slowlink.h: what the simulated slow link (slowlink.c, LD_PRELOAD'ed
 * libmoe_ep_slowlink.so) reports. A program finds the functions with
 * dlsym(RTLD_DEFAULT, ...) when the library is loaded. */
#ifndef MOE_EP_SLOWLINK_H
#define MOE_EP_SLOWLINK_H

#include <stdint.h>

struct moe_ep_slowlink_stats {
	int on;      /* MOE_EP_LINK was set */
	double gbps; /* the link: Gb/s, and latency per transfer */
	double latency_us;
	uint64_t transfers; /* collectives that used the link */
	uint64_t bytes;     /* bytes this rank put on it */
	double t_link;      /* seconds the link was busy with them */
	double t_exposed;   /* seconds this rank waited for it beyond MPI itself */
};

void moe_ep_slowlink_stats(struct moe_ep_slowlink_stats *out);
void moe_ep_slowlink_reset(void);

#endif
