/*
 * Encryption at rest in the PostgreSQL store: payloads sealed with an
 * aggregate's data key (XChaCha20-Poly1305, bound to where they are
 * stored by associated data), the built-in keyring of master keys that
 * wrap the data keys, and the data keys a transaction reads or makes.
 */
#include "store/pg/pg_int.h"

/* ---- encryption at rest ---- */

#define NONCE_BYTES crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
#define TAG_BYTES crypto_aead_xchacha20poly1305_ietf_ABYTES
#define SEAL_OVERHEAD (NONCE_BYTES + TAG_BYTES)
#define DEK_BYTES crypto_aead_xchacha20poly1305_ietf_KEYBYTES

static void ad_put(ad_buf *ad, const void *p, size_t n)
{
    memcpy(ad->b + ad->n, p, n);
    ad->n += n;
}

static void ad_u64(ad_buf *ad, uint64_t v)
{
    es__pg_be64(ad->b + ad->n, v);
    ad->n += 8;
}

void es__pg_ad_event(ad_buf *ad, const es_uuid *agg, uint64_t version)
{
    ad->n = 0;
    ad_put(ad, "E", 1);
    ad_put(ad, agg->bytes, 16);
    ad_u64(ad, version);
}

void es__pg_ad_snapshot(ad_buf *ad, const es_uuid *agg, uint64_t sv,
                        uint64_t version)
{
    ad->n = 0;
    ad_put(ad, "S", 1);
    ad_put(ad, agg->bytes, 16);
    ad_u64(ad, sv);
    ad_u64(ad, version);
}

void es__pg_ad_side_effect(ad_buf *ad, const es_side_effect *se)
{
    ad->n = 0;
    ad_put(ad, "O", 1);
    ad_put(ad, se->id.bytes, 16);
    ad_put(ad, se->aggregate_id.bytes, 16);
    ad_put(ad, se->event_id.bytes, 16);
}

/* A rejection's reason: its command id and aggregate. */
void es__pg_ad_rejection(ad_buf *ad, const es_uuid *command_id,
                         const es_uuid *agg)
{
    ad->n = 0;
    ad_put(ad, "R", 1);
    ad_put(ad, command_id->bytes, 16);
    ad_put(ad, agg->bytes, 16);
}

static void ad_data_key(ad_buf *ad, const es_uuid *agg, const char *kek)
{
    ad->n = 0;
    ad_put(ad, "K", 1);
    ad_put(ad, agg->bytes, 16);
    ad_put(ad, kek, strlen(kek));
}

/* Append nonce + ciphertext + tag of pt to b. */
int es__pg_seal_append(es_buf *b, const uint8_t *key, const ad_buf *ad,
                       const uint8_t *pt, size_t len)
{
    void *items = b->data;
    if (es__grow(&items, &b->cap, b->len + len + SEAL_OVERHEAD, 1) != 0)
        return ES_ENOMEM;
    b->data = items;
    uint8_t *out = b->data + b->len;
    randombytes_buf(out, NONCE_BYTES);
    crypto_aead_xchacha20poly1305_ietf_encrypt(out + NONCE_BYTES, NULL, pt,
                                               len, ad->b, ad->n, NULL, out,
                                               key);
    b->len += len + SEAL_OVERHEAD;
    return 0;
}

/* The same as one item of a binary array. */
int es__pg_array_sealed(es_buf *b, const uint8_t *key, const ad_buf *ad,
                        const uint8_t *pt, size_t len)
{
    int rc = es__pg_put32(b, (uint32_t)(len + SEAL_OVERHEAD));
    return rc == 0 ? es__pg_seal_append(b, key, ad, pt, len) : rc;
}

/* Open nonce + ciphertext + tag into out (replaced).  Returns 0, ES_ENOMEM
 * or NOT_OPEN (positive: not a status) when it does not open. */
#define NOT_OPEN 1
static int open_sealed(es_buf *out, const uint8_t *key, const ad_buf *ad,
                       const uint8_t *ct, size_t len)
{
    if (len < SEAL_OVERHEAD) return NOT_OPEN;
    size_t plen = len - SEAL_OVERHEAD;
    out->len = 0;
    void *items = out->data;
    if (es__grow(&items, &out->cap, plen ? plen : 1, 1) != 0)
        return ES_ENOMEM;
    out->data = items;
    if (crypto_aead_xchacha20poly1305_ietf_decrypt(
            out->data, NULL, NULL, ct + NONCE_BYTES, len - NONCE_BYTES, ad->b,
            ad->n, ct, key) != 0)
        return NOT_OPEN;
    out->len = plen;
    return 0;
}

static const pg_key *find_kek(const pg_store *s, const char *id)
{
    for (size_t i = 0; i < s->n_keys; i++)
        if (strcmp(s->keys[i].id, id) == 0) return &s->keys[i];
    return NULL;
}

/* The built-in provider: the config's master keys (es_pg_config_add_key),
 * wrapping with XChaCha20-Poly1305, the aggregate id and key id as
 * associated data.  ud is the pg_store. */
int es__pg_keyring_current(void *ud, char key_id[ES_PG_KEY_ID_MAX + 1],
                           es_error *err)
{
    (void)err;
    const pg_store *s = ud;
    strcpy(key_id, s->keys[s->n_keys - 1].id);
    return 0;
}

int es__pg_keyring_wrap(void *ud, const char *key_id,
                        const es_uuid *aggregate_id,
                        const uint8_t dek[ES_PG_KEY_BYTES],
                        uint8_t out[ES_PG_WRAPPED_MAX], size_t *len,
                        es_error *err)
{
    const pg_key *kek = find_kek(ud, key_id);
    if (kek == NULL)
        return es__error_set(err, ES_EINVAL, "no master key '%s'", key_id);
    ad_buf ad;
    ad_data_key(&ad, aggregate_id, key_id);
    randombytes_buf(out, NONCE_BYTES);
    crypto_aead_xchacha20poly1305_ietf_encrypt(out + NONCE_BYTES, NULL, dek,
                                               DEK_BYTES, ad.b, ad.n, NULL,
                                               out, kek->key);
    *len = DEK_BYTES + SEAL_OVERHEAD;
    return 0;
}

int es__pg_keyring_unwrap(void *ud, const char *key_id,
                          const es_uuid *aggregate_id, const uint8_t *wrapped,
                          size_t len, uint8_t dek[ES_PG_KEY_BYTES],
                          es_error *err)
{
    const pg_key *kek = find_kek(ud, key_id);
    if (kek == NULL)
        return es__error_set(err, ES_EDECRYPT, "wrapped by master key '%s', "
                             "which this store does not have", key_id);
    ad_buf ad;
    ad_data_key(&ad, aggregate_id, key_id);
    if (len != DEK_BYTES + SEAL_OVERHEAD ||
        crypto_aead_xchacha20poly1305_ietf_decrypt(
            dek, NULL, NULL, wrapped + NONCE_BYTES, len - NONCE_BYTES, ad.b,
            ad.n, wrapped, kek->key) != 0)
        return es__error_set(err, ES_EDECRYPT, "does not open with master "
                             "key '%s' (wrong key bytes?)", key_id);
    return 0;
}

static const dek_entry *dek_cache_put(pg_txn *t, const dek_entry *e)
{
    size_t i = t->n_dek < DEK_CACHE ? t->n_dek++ : t->next_dek;
    t->next_dek = (i + 1) % DEK_CACHE;
    t->dek[i] = *e;
    return &t->dek[i];
}

int es__pg_forgotten(es_error *err, const es_uuid *agg)
{
    char id[ES_UUID_STRLEN + 1];
    es__error_set(err, ES_EFORGOTTEN, "aggregate %s was forgotten: its data "
                  "key is destroyed", es_uuid_format(agg, id));
    if (err) err->aggregate_id = *agg;
    return ES_EFORGOTTEN;
}

static int undecryptable(es_error *err, const es_uuid *agg, const char *what)
{
    char id[ES_UUID_STRLEN + 1];
    es__error_set(err, ES_EDECRYPT, "aggregate %s: %s", es_uuid_format(agg, id),
                  what);
    if (err) err->aggregate_id = *agg;
    return ES_EDECRYPT;
}

/* The data key in row `row` of a key query's result (key_id, wrapped),
 * unwrapped into *e (locked: read FOR SHARE).  A NULL wrapped key is a
 * forgotten aggregate. */
int es__pg_dek_from_row(pg_store *s, const es_uuid *agg, const PGresult *r,
                        int row, bool locked, dek_entry *e, es_error *err)
{
    memset(e, 0, sizeof *e);
    e->agg = *agg;
    e->locked = locked;
    if (PQgetisnull(r, row, 1)) return es__pg_forgotten(err, agg);
    snprintf(e->kek, sizeof e->kek, "%s", PQgetvalue(r, row, 0));
    const uint8_t *w = (const uint8_t *)PQgetvalue(r, row, 1);
    size_t wlen = (size_t)PQgetlength(r, row, 1);
    es_error inner = {0};
    int rc = s->provider.unwrap(s->provider.ud, e->kek, agg, w, wlen, e->dek,
                                &inner);
    if (rc == 0) return 0;
    sodium_memzero(e, sizeof *e);
    char id[ES_UUID_STRLEN + 1];
    es__error_wrap(err, rc < 0 ? rc : ES_EDECRYPT, &inner,
                   "aggregate %s: its data key", es_uuid_format(agg, id));
    if (err) err->aggregate_id = *agg;
    return rc < 0 ? rc : ES_EDECRYPT;
}

/* A new data key for agg in *e, wrapped by the newest master key into
 * wrapped (*wlen bytes), to be stored with SQL_PUT_KEY. */
int es__pg_dek_new(pg_store *s, const es_uuid *agg, dek_entry *e,
                   uint8_t wrapped[ES_PG_WRAPPED_MAX], size_t *wlen,
                   es_error *err)
{
    memset(e, 0, sizeof *e);
    e->agg = *agg;
    e->locked = true; /* our own uncommitted row */
    crypto_aead_xchacha20poly1305_ietf_keygen(e->dek);
    *wlen = 0;
    es_error inner = {0};
    int rc = s->provider.current(s->provider.ud, e->kek, &inner);
    if (rc == 0 && !es__pg_key_id_valid(e->kek))
        rc = es__error_set(&inner, ES_EINVAL, "the key provider named "
                           "an invalid master key id");
    if (rc == 0)
        rc = s->provider.wrap(s->provider.ud, e->kek, agg, e->dek, wrapped,
                              wlen, &inner);
    if (rc == 0 && (*wlen == 0 || *wlen > ES_PG_WRAPPED_MAX))
        rc = es__error_set(&inner, ES_EINVAL, "the key provider wrapped "
                           "a data key into %zu bytes", *wlen);
    if (rc == 0) return 0;
    sodium_memzero(e, sizeof *e);
    return es__error_wrap(err, rc < 0 ? rc : ES_EIO, &inner,
                          "wrapping a data key");
}

/* The data key of an aggregate: from the transaction's cache, from the
 * keys table, or (create) a new one wrapped by the newest master key.
 * ES_ENOTFOUND when there is none and create is false.  *out is valid
 * until the next call.  Writers (create) read the key row FOR SHARE, so
 * that a concurrent es_pg_forget_aggregate either waits for them or, if it
 * came first, makes them fail with ES_EFORGOTTEN: nothing is sealed with
 * a key being destroyed. */
int es__pg_get_dek(pg_txn *t, const es_uuid *agg, bool create,
                   const dek_entry **out, es_error *err)
{
    pg_store *s = (pg_store *)t->base.store;
    for (size_t i = 0; i < t->n_dek; i++)
        if (es_uuid_equal(&t->dek[i].agg, agg)) {
            if (create && !t->dek[i].locked) {
                /* read for reading only: read it again, locked */
                t->dek[i] = t->dek[--t->n_dek];
                sodium_memzero(&t->dek[t->n_dek], sizeof t->dek[0]);
                t->next_dek = t->n_dek % DEK_CACHE;
                break;
            }
            *out = &t->dek[i];
            return 0;
        }
    const Oid types[3] = {OID_UUID, OID_TEXT, OID_BYTEA};
    for (int attempt = 0; attempt < 2; attempt++) {
        const char *values[1] = {(const char *)agg->bytes};
        const int lens[1] = {16};
        PGresult *r = NULL;
        int rc = es__pg_run(t->conn, "read data key",
                            s->sql[create ? SQL_LOCK_KEY : SQL_GET_KEY], 1,
                            types, values, lens, &r, err);
        if (rc != 0) return rc;
        dek_entry e;
        if (PQntuples(r) == 1) {
            rc = es__pg_dek_from_row(s, agg, r, 0, create, &e, err);
            PQclear(r);
            if (rc == 0) *out = dek_cache_put(t, &e);
            sodium_memzero(&e, sizeof e);
            return rc;
        }
        PQclear(r);
        if (!create) return ES_ENOTFOUND;

        uint8_t wrapped[ES_PG_WRAPPED_MAX];
        size_t wlen = 0;
        if ((rc = es__pg_dek_new(s, agg, &e, wrapped, &wlen, err)) != 0)
            return rc;
        const char *ivalues[3] = {(const char *)agg->bytes, e.kek,
                                  (const char *)wrapped};
        const int ilens[3] = {16, (int)strlen(e.kek), (int)wlen};
        rc = es__pg_run(t->conn, "store data key", s->sql[SQL_PUT_KEY], 3,
                        types, ivalues, ilens, &r, err);
        bool mine = rc == 0 && strcmp(PQcmdTuples(r), "1") == 0;
        if (rc == 0) PQclear(r);
        if (mine) *out = dek_cache_put(t, &e);
        sodium_memzero(&e, sizeof e);
        if (rc != 0 || mine) return rc;
        /* Another transaction made one first: read that one. */
    }
    return es__error_set(err, ES_EDB, "data key could not be created");
}

/* A payload read from a row: as it is when the row's key_id is NULL, else
 * opened into buf (*data and *len then point there). */
int es__pg_open_row(pg_txn *t, const es_uuid *agg, const PGresult *r, int row,
                    int key_col, const ad_buf *ad, es_buf *buf,
                    const uint8_t **data, size_t *len, es_error *err)
{
    if (PQgetisnull(r, row, key_col)) return 0;
    pg_store *s = (pg_store *)t->base.store;
    char why[160];
    if (!s->encrypt) {
        snprintf(why, sizeof why, "data sealed with master key '%.63s', "
                 "but the store has no keys", PQgetvalue(r, row, key_col));
        return undecryptable(err, agg, why);
    }
    const dek_entry *d = NULL;
    int rc = es__pg_get_dek(t, agg, false, &d, err);
    if (rc == ES_ENOTFOUND) return es__pg_forgotten(err, agg);
    if (rc != 0) return rc;
    rc = open_sealed(buf, d->dek, ad, *data, *len);
    if (rc == ES_ENOMEM) return es__error_set(err, rc, "out of memory");
    if (rc != 0)
        return undecryptable(err, agg, "a sealed value does not open "
                             "(tampered, truncated or moved)");
    *data = buf->data;
    *len = buf->len;
    return 0;
}
