/*
 * libFuzzer target: the bank's request parsing, as bank-server does it:
 * the JSON body (jansson with duplicate keys rejected, 64 KiB at most),
 * the fields it takes (ids, amounts, names), the route's path, the
 * command codec the fields end in.  bank-server's own field readers
 * (server_request.c) are used, so the target tests that code, not a copy.
 */
#include "../../examples/bank/server_request.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* The path: the first line, as handle_post and handle_get scan it. */
    const uint8_t *nl = memchr(data, '\n', size);
    size_t plen = nl ? (size_t)(nl - data) : 0;
    char path[512];
    if (plen >= sizeof path) plen = sizeof path - 1;
    memcpy(path, data, plen);
    path[plen] = '\0';
    char id_text[ES_UUID_STRLEN + 2], sub[32];
    es_uuid id;
    if (sscanf(path, "/accounts/%36[0-9a-fA-F-]/%31s", id_text, sub) == 2)
        (void)es_uuid_parse(id_text, &id);
    if (sscanf(path, "/accounts/%37s", id_text) == 1)
        (void)es_uuid_parse(id_text, &id);

    const uint8_t *body = nl ? nl + 1 : data;
    size_t blen = size - (size_t)(body - data);
    if (blen == 0 || blen > MAX_BODY) return 0;
    json_error_t jerr;
    json_t *o = json_loadb((const char *)body, blen, JSON_REJECT_DUPLICATES,
                           &jerr);
    if (o == NULL) return 0;
    if (json_is_object(o)) {
        bank_command c;
        memset(&c, 0, sizeof c);
        es_uuid cid, key;
        /* Each getter that says no gives the detail the answer carries. */
        char d[6][200];
        memset(d, 0, sizeof d);
        bool r[6] = {
            srv_get_uuid_field(o, "command_id", &cid, d[0], sizeof d[0]),
            srv_get_uuid_field(o, "account_id", &key, d[1], sizeof d[1]),
            srv_get_amount(o, "amount", &c.amount, false, d[2], sizeof d[2]),
            srv_get_amount(o, "initial_balance", &c.amount, true, d[3],
                       sizeof d[3]),
            srv_get_text(o, "owner", c.owner, d[4], sizeof d[4]),
            srv_get_text(o, "email", c.email, d[5], sizeof d[5]),
        };
        bool ok = true;
        for (int i = 0; i < 6; i++) {
            if (!r[i] && d[i][0] == '\0') abort();
            ok &= r[i];
        }
        if (c.amount < 0) abort();
        if (strlen(c.owner) >= BANK_NAME_MAX) abort();
        c.kind = BANK_CMD_OPEN;
        es_buf buf = {0};
        if (bank_command_encode(&c, &buf) != 0) abort();
        bank_command back;
        if (bank_command_decode(buf.data, buf.len, &back) != 0) abort();
        if (back.amount != c.amount || strcmp(back.owner, c.owner) != 0)
            abort();
        es_buf_free(&buf);
        (void)ok;
    }
    json_decref(o);
    return 0;
}
