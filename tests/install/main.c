/* A program that uses one compiled model through the header moegen wrote. */
#include MODEL_HEADER

#include <stdio.h>

int main(void)
{
	const struct moe_info *i = moe_info();
	moe_model *m;
	struct moe_create_opts o = {.threads = 1};
	if (i->abi_version != MOE_ABI_VERSION || moe_create(&m, &o) != MOE_OK ||
	    moe_init_random(m, 1) != MOE_OK) {
		fprintf(stderr, "setup failed: %s\n", moe_last_error());
		return 1;
	}
	enum { T = 3 };
	float x[T * MOE_MODEL_HIDDEN], y[T * MOE_MODEL_HIDDEN];
	for (int j = 0; j < T * MOE_MODEL_HIDDEN; j++)
		x[j] = (float)(j % 5) * 0.3f - 0.6f;
	if (moe_forward(m, moe_model_moe_layers[0], x, y, T, NULL, NULL) != MOE_OK) {
		fprintf(stderr, "forward failed: %s\n", moe_last_error());
		return 1;
	}
	double s = 0;
	for (int j = 0; j < T * MOE_MODEL_HIDDEN; j++)
		s += (double)y[j] * y[j];
	printf("%s hidden %u sumsq %.6g\n", i->name, i->hidden, s);
	moe_destroy(m);
	return s > 0 ? 0 : 1;
}
