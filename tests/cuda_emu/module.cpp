/* module.cpp: one generated source compiled for the host emulation (emu.h)
 * into a shared object that the emulated driver (driver.c) loads in place
 * of a cubin. Build: c++ -std=c++17 -shared -fPIC -I tests/cuda_emu
 * -DMOE_EMU_SOURCE='"model.cu"' module.cpp. */
#include "emu.h"

#include MOE_EMU_SOURCE

/* kernels that only some models have */
extern "C" void moe_jitter(const moe_args a) __attribute__((weak));
extern "C" void moe_ec_select(const moe_args a) __attribute__((weak));
extern "C" void moe_cap_order(const moe_args a) __attribute__((weak));
extern "C" void moe_capacity(const moe_args a) __attribute__((weak));
extern "C" void moe_cap_normalize(const moe_args a) __attribute__((weak));
extern "C" void moe_shared_up(const moe_args a) __attribute__((weak));
extern "C" void moe_shared_down(const moe_args a) __attribute__((weak));

template <class A, void (*K)(const A)> static void body(void *p)
{
	K(*(const A *)p);
}

struct entry {
	const char *name;
	void (*body)(void *);
	bool present;
	size_t arg_size;
};

#define FWD(k)                                                                                     \
	{                                                                                          \
#k, body < moe_args, k>, k != nullptr, sizeof(moe_args)                            \
	}
static const entry table[] = {
    FWD(moe_jitter),
    FWD(moe_route_small),
    FWD(moe_route_logits),
    FWD(moe_route_select),
    FWD(moe_ec_select),
    FWD(moe_cap_order),
    FWD(moe_capacity),
    FWD(moe_cap_normalize),
    FWD(moe_group_mask),
    FWD(moe_group_offsets),
    FWD(moe_group_scatter),
    FWD(moe_up),
    FWD(moe_down),
    FWD(moe_shared_up),
    FWD(moe_shared_down),
    FWD(moe_combine),
    {"moe_pack", body<moe_pack_args, moe_pack>, true, sizeof(moe_pack_args)},
};

extern "C" int moe_emu_find(const char *name)
{
	for (int i = 0; i < (int)(sizeof table / sizeof *table); i++)
		if (!strcmp(table[i].name, name))
			return table[i].present ? i : -1;
	return -1;
}

extern "C" void moe_emu_launch(int k, const unsigned grid[3], const unsigned block[3], void *arg)
{
	emu_launch(table[k].body, arg, emu_dim3{grid[0], grid[1], grid[2]},
		   emu_dim3{block[0], block[1], block[2]});
}

extern "C" size_t moe_emu_arg_size(int k)
{
	return table[k].arg_size;
}
