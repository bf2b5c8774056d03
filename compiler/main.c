/* main.c: the moegen command. */
#include "moegen.h"

int main(void)
{
	return 0;
}
