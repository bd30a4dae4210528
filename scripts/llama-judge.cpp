// lorakit's window into llama.cpp for the tests: loads a GGUF model (and optional LoRA adapter
// GGUFs) through llama.cpp's own library, evaluates a token sequence and writes what llama.cpp
// computed, so that tests compare lorakit against llama.cpp itself. Built by
// scripts/build-llama-cpp.sh.
//
//   llama-judge MODEL.gguf [--lora FILE [--lora-scale S]]... --ids 1,2,3 [--logits OUT.f32]
//               [--greedy N]
//
//   llama-judge MODEL.gguf --chat ROLE TEXT [--chat ROLE TEXT]...
//   llama-judge MODEL.gguf --tokenize TEXTS
//   llama-judge --quantize TYPE ROW IN.f32 OUT
//
// --logits writes the logits of every position, [n_ids, n_vocab] little-endian f32.
// --greedy N continues the sequence greedily (argmax, first index on ties) for N tokens and
// prints them on stdout as `greedy: id id ...` (all N: end-of-generation tokens do not stop it).
// --chat builds the prompt as llama-server and llama-cli do (the model's own chat template run by
// llama.cpp's Jinja engine, generation prompt added, tokenised with special tokens parsed) and
// prints `chat-ids: id id ...` and `eog: id id ...` (every token llama.cpp ends generation at).
// --tokenize reads TEXTS (strings, each ended by a NUL byte) and prints `ids: id id ...` for each,
// tokenised as a completion prompt is (the vocabulary's BOS rule, special-token text parsed).
// --quantize quantises IN (rows of ROW little-endian f32) to TYPE (a ggml type name such as q4_K)
// with ggml_quantize_chunk, the quantiser llama-quantize runs, and writes the blocks to OUT.
// Weights stay as the file stores them (no repacking), K/V caches are f32 and flash attention is off, so llama.cpp's only roundings are its own
// weight formats and its quantised-activation products.
#include "chat.h"
#include "common.h"
#include "ggml.h"
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <strings.h>
#include <string>
#include <vector>

static void fail(const char *msg) {
    fprintf(stderr, "llama-judge: %s\n", msg);
    exit(1);
}

static std::vector<char> read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) fail((std::string("cannot open ") + path).c_str());
    std::vector<char> data;
    char buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + got);
    fclose(f);
    return data;
}

static int quantize_main(int argc, char **argv) {
    if (argc != 6) fail("usage: llama-judge --quantize TYPE ROW IN.f32 OUT");
    int type = -1;
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char *name = ggml_type_name((enum ggml_type) t);
        if (name && strcasecmp(name, argv[2]) == 0) type = t;
    }
    if (type < 0) fail("unknown type");
    const int64_t row = atoll(argv[3]);
    std::vector<char> in = read_file(argv[4]);
    if (row <= 0 || in.size() % (4 * row) != 0) fail("the input is not whole rows of f32");
    const int64_t rows = (int64_t) in.size() / (4 * row);
    std::vector<char> out(ggml_row_size((enum ggml_type) type, row) * rows);
    const size_t n = ggml_quantize_chunk((enum ggml_type) type, (const float *) in.data(),
                                         out.data(), 0, rows, row, nullptr);
    FILE *f = fopen(argv[5], "wb");
    if (!f || fwrite(out.data(), 1, n, f) != n) fail("cannot write the output");
    fclose(f);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && std::string(argv[1]) == "--quantize") return quantize_main(argc, argv);
    if (argc < 2) fail("usage: llama-judge MODEL.gguf [--lora FILE [--lora-scale S]]... --ids 1,2,3 [--logits OUT] [--greedy N]");
    std::string model_path = argv[1];
    std::vector<std::string> loras;
    std::vector<float> scales;
    std::vector<llama_token> ids;
    std::string logits_path;
    int greedy = 0;
    std::vector<std::pair<std::string, std::string>> chat;
    std::string tokenize_path;
    for (int i = 2; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() -> const char * {
            if (i + 1 >= argc) fail(("missing value after " + a).c_str());
            return argv[++i];
        };
        if (a == "--lora") { loras.push_back(next()); scales.push_back(1.0f); }
        else if (a == "--lora-scale") { if (scales.empty()) fail("--lora-scale before --lora"); scales.back() = strtof(next(), nullptr); }
        else if (a == "--ids") {
            std::string s = next();
            size_t p = 0;
            while (p < s.size()) {
                size_t q = s.find(',', p);
                if (q == std::string::npos) q = s.size();
                ids.push_back((llama_token) atoi(s.substr(p, q - p).c_str()));
                p = q + 1;
            }
        }
        else if (a == "--logits") logits_path = next();
        else if (a == "--tokenize") tokenize_path = next();
        else if (a == "--chat") {
            std::string role = next();
            chat.emplace_back(role, next());
        }
        else if (a == "--greedy") greedy = atoi(next());
        else fail(("unknown argument " + a).c_str());
    }
    if (ids.empty() && chat.empty() && tokenize_path.empty()) fail("--ids, --chat or --tokenize is required");

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    // No repacked weights or AMX tiles: the plain CPU kernels, the same on every machine (AMX
    // tiles also need a permission some kernels do not grant: SIGILL).
    mp.use_extra_bufts = false;
    llama_model *model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) fail("cannot load the model");
    if (!tokenize_path.empty()) {
        std::vector<char> texts = read_file(tokenize_path.c_str());
        const llama_vocab *vocab = llama_model_get_vocab(model);
        size_t start = 0;
        for (size_t i = 0; i < texts.size(); i++) {
            if (texts[i] != 0) continue;
            std::string text(texts.data() + start, i - start);
            printf("ids:");
            for (llama_token t : common_tokenize(vocab, text, true, true)) printf(" %d", t);
            printf("\n");
            start = i + 1;
        }
        llama_model_free(model);
        llama_backend_free();
        return 0;
    }
    if (!chat.empty()) {
        // What llama-server and llama-cli do for a chat request: the model's own template run by
        // llama.cpp's Jinja engine, then the prompt tokenised with special tokens parsed.
        common_chat_templates_ptr tmpls = common_chat_templates_init(model, "");
        common_chat_templates_inputs in;
        for (auto &m : chat) {
            common_chat_msg msg;
            msg.role = m.first;
            msg.content = m.second;
            in.messages.push_back(msg);
        }
        in.add_generation_prompt = true;
        in.use_jinja = true;
        const std::string text = common_chat_templates_apply(tmpls.get(), in).prompt;
        const llama_vocab *vocab = llama_model_get_vocab(model);
        std::vector<llama_token> toks = common_tokenize(vocab, text, true, true);
        printf("chat-ids:");
        for (llama_token t : toks) printf(" %d", t);
        printf("\neog:");
        for (int t = 0; t < llama_vocab_n_tokens(vocab); t++)
            if (llama_vocab_is_eog(vocab, t)) printf(" %d", t);
        printf("\n");
        tmpls.reset();
        llama_model_free(model);
        llama_backend_free();
        return 0;
    }
    std::vector<llama_adapter_lora *> adapters;
    for (auto &p : loras) {
        llama_adapter_lora *ad = llama_adapter_lora_init(model, p.c_str());
        if (!ad) fail(("cannot load the adapter " + p).c_str());
        adapters.push_back(ad);
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (ids.size() + greedy + 8);
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) fail("cannot create a context");
    if (!adapters.empty() &&
        llama_set_adapters_lora(ctx, adapters.data(), adapters.size(), scales.data()) != 0)
        fail("cannot set the adapters");

    const llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    const int n = (int) ids.size();
    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = ids[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) fail("llama_decode failed");

    if (!logits_path.empty()) {
        FILE *f = fopen(logits_path.c_str(), "wb");
        if (!f) fail("cannot open the logits file");
        for (int i = 0; i < n; i++) {
            const float *l = llama_get_logits_ith(ctx, i);
            if (fwrite(l, sizeof(float), n_vocab, f) != (size_t) n_vocab) fail("write failed");
        }
        fclose(f);
    }

    if (greedy > 0) {
        auto argmax = [&](const float *l) {
            int best = 0;
            for (int v = 1; v < n_vocab; v++) if (l[v] > l[best]) best = v;
            return best;
        };
        printf("greedy:");
        llama_token tok = argmax(llama_get_logits_ith(ctx, n - 1));
        int pos = n;
        for (int k = 0; k < greedy; k++) {
            printf(" %d", tok);
            llama_batch one = llama_batch_get_one(&tok, 1);
            (void) pos;
            if (llama_decode(ctx, one) != 0) fail("llama_decode failed");
            pos++;
            tok = argmax(llama_get_logits_ith(ctx, -1));
        }
        printf("\n");
    }
    llama_batch_free(batch);
    llama_free(ctx);
    for (auto *ad : adapters) llama_adapter_lora_free(ad);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
