/* version.c: `moegen --version`: the version, the git revision, LLVM, the
 * targets (the host triple and CPU, NVRTC when it opens) and the ABI. */
#include "moegen.h"

#include <llvm-c/Core.h>
#include <llvm-c/TargetMachine.h>

#include "backend.h"
#include "cuda.h"

#ifndef MOE_VERSION
#define MOE_VERSION "unknown"
#endif
#ifndef MOE_GIT_REV
#define MOE_GIT_REV "unknown"
#endif

void moe_version_print(FILE *out)
{
	unsigned major, minor, patch;
	LLVMGetVersion(&major, &minor, &patch);
	char *triple = LLVMGetDefaultTargetTriple(), *cpu = LLVMGetHostCPUName();
	char nvrtc[32];
	moe_nvrtc_version(nvrtc, sizeof nvrtc);
	fprintf(out, "moegen %s (git %s)\n", MOE_VERSION, MOE_GIT_REV);
	fprintf(out, "LLVM %u.%u.%u\n", major, minor, patch);
	fprintf(out, "target cpu: LLVM IR for any LLVM triple; host %s, cpu %s\n", triple, cpu);
	if (nvrtc[0])
		fprintf(out, "target cuda: NVRTC %s; default archs %s\n", nvrtc,
			MOE_CUDA_DEFAULT_ARCHS);
	else
		fprintf(out, "target cuda: NVRTC not found (set MOE_NVRTC or CUDA_HOME)\n");
	fprintf(out, "ABI %d\n", MOE_ABI_VERSION);
	LLVMDisposeMessage(triple);
	LLVMDisposeMessage(cpu);
}
