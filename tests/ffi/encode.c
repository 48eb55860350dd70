/* A host program: load an encoder through the C header, encode one prompt, print a summary.
 * Usage: encode_c MODEL_DIR ADAPTER_DIR */
#include <stdio.h>
#include <stdlib.h>
#include "qwenclip.h"

static int fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, qwenclip_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    if (qwenclip_abi_version() != QWENCLIP_ABI_VERSION) return fail("abi");
    char config[4096];
    snprintf(config, sizeof config, "{\"model\": \"%s\", \"adapter\": \"%s\"}", argv[1], argv[2]);
    uint64_t enc = 0;
    if (qwenclip_encoder_load(config, &enc) != QWENCLIP_OK) return fail("load");
    size_t seq = 0, embed = 0, pooled = 0;
    if (qwenclip_encoder_output_shape(enc, &seq, &embed, &pooled) != QWENCLIP_OK) return fail("shape");
    const char *prompts[1] = {"a lighthouse under the stars"};
    float *e = malloc(seq * embed * sizeof(float));
    float *p = malloc(pooled * sizeof(float));
    if (qwenclip_encode(enc, prompts, 1, e, seq * embed, p, pooled) != QWENCLIP_OK) return fail("encode");
    printf("shape %zu %zu %zu first %.6f last %.6f pooled0 %.6f\n", seq, embed, pooled, e[0], e[seq * embed - 1], p[0]);
    free(e);
    free(p);
    if (qwenclip_encoder_free(enc) != QWENCLIP_OK) return fail("free");
    if (qwenclip_encoder_free(enc) != QWENCLIP_INVALID_HANDLE) return fail("double free was not caught");
    return 0;
}
