/* check_runner.c: `moegen run` without the compiler, for model.so files of a
 * cross target: built with that target's runtime archive (cmake/runtime) and
 * run under qemu-user by tests/cross/run.sh. argv as `moegen run`'s:
 * MODEL.so [--random SEED] [--tokens N] [--check] ... */
#include "backend.h"

int main(int argc, char **argv)
{
	argv[0] = (char *)"run";
	return moe_cmd_run(argc, argv);
}
