/* slowlink.c: a slow network link simulated around MPI through its
 * profiling interface (PMPI), for measuring how much of the expert-parallel
 * exchange the computation hides (`moegen bench --ep`, docs/ep.md). Loaded
 * with LD_PRELOAD (libmoe_ep_slowlink.so); MOE_EP_LINK="GBPS[,LATENCY_US]"
 * sets the link (unset: every call passes through untouched).
 *
 * The model: each rank has one full-duplex link. A collective that moves s
 * bytes out of the rank and r bytes in occupies it for latency + max(s, r) /
 * bandwidth, after the transfers posted before it (the link is a queue). A
 * non-blocking MPI_Ialltoallv is complete, for the caller, no earlier than
 * the end of its slot: MPI_Wait sleeps until then when MPI itself was faster.
 * A blocking MPI_Alltoall is exposed whole. The time spent sleeping is the
 * link time the computation did not hide. Bytes a rank sends itself do not
 * cross the link. */
#define _POSIX_C_SOURCE 200809L
#include <mpi.h>

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "slowlink.h"

#define MAX_PENDING 64

static struct {
	int init, on;
	double bytes_per_s, latency;
	double link_free; /* when the link finishes what it was given */
	struct {
		MPI_Request req;
		double ready;
	} pending[MAX_PENDING];
	struct moe_ep_slowlink_stats st;
} L;

static double now(void)
{
	return PMPI_Wtime();
}

static void setup(void)
{
	if (L.init)
		return;
	L.init = 1;
	const char *s = getenv("MOE_EP_LINK");
	if (!s || !*s)
		return;
	char *end;
	double gbps = strtod(s, &end), us = 0;
	if (end == s || gbps <= 0)
		return;
	if (*end == ',')
		us = strtod(end + 1, NULL);
	L.on = 1;
	L.bytes_per_s = gbps * 1e9 / 8;
	L.latency = us > 0 ? us * 1e-6 : 0;
	L.st.gbps = gbps;
	L.st.latency_us = us;
}

static void sleep_until(double t)
{
	double d = t - now();
	if (d <= 0)
		return;
	struct timespec ts = {(time_t)d, (long)((d - (double)(time_t)d) * 1e9)};
	nanosleep(&ts, NULL);
	L.st.t_exposed += d;
}

/* Occupy the link for a transfer of out/in bytes; returns when it ends. */
static double occupy(double out, double in)
{
	double t = now(), start = L.link_free > t ? L.link_free : t;
	double dur = L.latency + (out > in ? out : in) / L.bytes_per_s;
	L.link_free = start + dur;
	L.st.t_link += dur;
	L.st.bytes += (uint64_t)out;
	L.st.transfers++;
	return L.link_free;
}

static double off_rank(const int *counts, MPI_Datatype t, MPI_Comm comm)
{
	int P, me, size;
	MPI_Comm_size(comm, &P);
	MPI_Comm_rank(comm, &me);
	MPI_Type_size(t, &size);
	double b = 0;
	for (int q = 0; q < P; q++)
		if (q != me)
			b += (double)counts[q] * size;
	return b;
}

int MPI_Ialltoallv(const void *sendbuf, const int sendcounts[], const int sdispls[],
		   MPI_Datatype sendtype, void *recvbuf, const int recvcounts[],
		   const int rdispls[], MPI_Datatype recvtype, MPI_Comm comm, MPI_Request *request)
{
	setup();
	int rc = PMPI_Ialltoallv(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts,
				 rdispls, recvtype, comm, request);
	if (!L.on || rc != MPI_SUCCESS)
		return rc;
	double ready =
	    occupy(off_rank(sendcounts, sendtype, comm), off_rank(recvcounts, recvtype, comm));
	for (int i = 0; i < MAX_PENDING; i++)
		if (L.pending[i].req == MPI_REQUEST_NULL || L.pending[i].ready == 0) {
			L.pending[i].req = *request;
			L.pending[i].ready = ready;
			return rc;
		}
	sleep_until(ready); /* no slot left: complete it now */
	return rc;
}

int MPI_Wait(MPI_Request *request, MPI_Status *status)
{
	setup();
	MPI_Request r = *request;
	int rc = PMPI_Wait(request, status);
	if (!L.on)
		return rc;
	for (int i = 0; i < MAX_PENDING; i++)
		if (L.pending[i].ready != 0 && L.pending[i].req == r) {
			double ready = L.pending[i].ready;
			L.pending[i].ready = 0;
			L.pending[i].req = MPI_REQUEST_NULL;
			sleep_until(ready);
			break;
		}
	return rc;
}

int MPI_Alltoall(const void *sendbuf, int sendcount, MPI_Datatype sendtype, void *recvbuf,
		 int recvcount, MPI_Datatype recvtype, MPI_Comm comm)
{
	setup();
	int rc = PMPI_Alltoall(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm);
	if (!L.on || rc != MPI_SUCCESS)
		return rc;
	int P, ss, rs;
	MPI_Comm_size(comm, &P);
	MPI_Type_size(sendtype, &ss);
	MPI_Type_size(recvtype, &rs);
	sleep_until(occupy((double)(P - 1) * sendcount * ss, (double)(P - 1) * recvcount * rs));
	return rc;
}

void moe_ep_slowlink_stats(struct moe_ep_slowlink_stats *out)
{
	setup();
	*out = L.st;
	out->on = L.on;
}

void moe_ep_slowlink_reset(void)
{
	setup();
	double g = L.st.gbps, us = L.st.latency_us;
	L.st = (struct moe_ep_slowlink_stats){0};
	L.st.gbps = g;
	L.st.latency_us = us;
}
