/* The bank's domain: codecs, apply, side effects, decide, the saga. */
#include "bank.h"

#include <sodium.h>
#include <stdio.h>
#include <string.h>

/* ---- a small deterministic byte codec ---- */

typedef struct reader {
    const uint8_t *p;
    size_t left;
    bool bad;
} reader;

static int put_u8(es_buf *b, uint8_t v) { return es_buf_append(b, &v, 1); }

static int put_i64(es_buf *b, int64_t v)
{
    uint8_t x[8];
    for (int i = 0; i < 8; i++) x[i] = (uint8_t)((uint64_t)v >> (8 * i));
    return es_buf_append(b, x, 8);
}

static int put_uuid(es_buf *b, const es_uuid *id)
{
    return es_buf_append(b, id->bytes, 16);
}

static int put_str(es_buf *b, const char *s)
{
    size_t n = strnlen(s, BANK_NAME_MAX - 1);
    uint8_t len = (uint8_t)n;
    int rc = es_buf_append(b, &len, 1);
    return rc ? rc : es_buf_append(b, s, n);
}

static const uint8_t *take(reader *r, size_t n)
{
    if (r->bad || r->left < n) {
        r->bad = true;
        return NULL;
    }
    const uint8_t *p = r->p;
    r->p += n;
    r->left -= n;
    return p;
}

static uint8_t get_u8(reader *r)
{
    const uint8_t *p = take(r, 1);
    return p ? p[0] : 0;
}

static int64_t get_i64(reader *r)
{
    const uint8_t *p = take(r, 8);
    uint64_t u = 0;
    for (int i = 0; p && i < 8; i++) u |= (uint64_t)p[i] << (8 * i);
    return (int64_t)u;
}

static void get_uuid(reader *r, es_uuid *id)
{
    const uint8_t *p = take(r, 16);
    if (p) memcpy(id->bytes, p, 16);
}

static void get_str(reader *r, char out[BANK_NAME_MAX])
{
    uint8_t n = get_u8(r);
    const uint8_t *p = n < BANK_NAME_MAX ? take(r, n) : NULL;
    if (p == NULL) {
        r->bad = true;
        out[0] = '\0';
        return;
    }
    memcpy(out, p, n);
    out[n] = '\0';
}

static int finish_read(reader *r, es_error *err)
{
    if (r->bad || r->left != 0) {
        if (err) snprintf(err->message, sizeof err->message, "bad bytes");
        return ES_EDECODE;
    }
    return 0;
}

/* ---- the account aggregate ---- */

static es_uuid acc_event_id(const void *e)
{
    return ((const bank_account_event *)e)->id;
}

static int32_t acc_event_kind(const void *e)
{
    return (int32_t)((const bank_account_event *)e)->kind;
}

static const char *acc_kind_name(int32_t kind)
{
    switch ((bank_account_event_kind)kind) {
    case BANK_OPENED: return "opened";
    case BANK_DEPOSITED: return "deposited";
    case BANK_WITHDRAWN: return "withdrawn";
    case BANK_TRANSFER_DEBITED: return "transfer_debited";
    case BANK_TRANSFER_CREDITED: return "transfer_credited";
    case BANK_TRANSFER_REFUNDED: return "transfer_refunded";
    }
    return NULL;
}

static int fail(es_error *err, const char *why)
{
    snprintf(err->message, sizeof err->message, "%s", why);
    return ES_EAPPLY;
}

static int acc_apply(void *state, const void *event, es_error *err)
{
    bank_account *a = state;
    const bank_account_event *e = event;
    switch (e->kind) {
    case BANK_OPENED:
        return fail(err, "account is already open");
    case BANK_DEPOSITED:
    case BANK_TRANSFER_CREDITED:
    case BANK_TRANSFER_REFUNDED:
        if (e->amount <= 0 || a->balance > INT64_MAX - e->amount ||
            a->balance + e->amount != e->balance)
            return fail(err, "amount out of range");
        a->balance += e->amount;
        return 0;
    case BANK_WITHDRAWN:
    case BANK_TRANSFER_DEBITED:
        if (e->amount <= 0 || e->amount > a->balance ||
            a->balance - e->amount != e->balance)
            return fail(err, "amount out of range");
        a->balance -= e->amount;
        return 0;
    }
    return fail(err, "unknown event kind");
}

static int acc_apply_new(void *state, const void *event, es_error *err)
{
    bank_account *a = state;
    const bank_account_event *e = event;
    switch (e->kind) {
    case BANK_OPENED:
        if (e->amount < 0) return fail(err, "negative initial balance");
        memcpy(a->owner, e->owner, sizeof a->owner);
        memcpy(a->email, e->email, sizeof a->email);
        a->balance = e->amount;
        return 0;
    case BANK_DEPOSITED:
    case BANK_WITHDRAWN:
    case BANK_TRANSFER_DEBITED:
    case BANK_TRANSFER_CREDITED:
    case BANK_TRANSFER_REFUNDED:
        break;
    }
    return fail(err, "the first event must open the account");
}

static int acc_side_effects(const void *state, const void *event,
                            es_side_effect_sink *sink, es_error *err)
{
    (void)err;
    const bank_account *a = state;
    const bank_account_event *e = event;
    bank_effect fx;
    memset(&fx, 0, sizeof fx);
    switch (e->kind) {
    case BANK_OPENED:
        fx.kind = BANK_FX_WELCOME_EMAIL;
        fx.id = bank_derive_id(&e->id, "welcome");
        memcpy(fx.email, a->email, sizeof fx.email);
        return es_side_effect_emit(sink, &fx);
    case BANK_TRANSFER_DEBITED:
        fx.kind = BANK_FX_CREDIT;
        fx.id = bank_derive_id(&e->transfer_id, "credit-effect");
        fx.transfer_id = e->transfer_id;
        fx.to = e->other;
        fx.amount = e->amount;
        return es_side_effect_emit(sink, &fx);
    case BANK_DEPOSITED:
    case BANK_WITHDRAWN:
    case BANK_TRANSFER_CREDITED:
    case BANK_TRANSFER_REFUNDED:
        return 0;
    }
    return 0;
}

static int acc_state_encode(const void *s, es_buf *out, es_error *err)
{
    (void)err;
    const bank_account *a = s;
    int rc = put_str(out, a->owner);
    if (rc == 0) rc = put_str(out, a->email);
    if (rc == 0) rc = put_i64(out, a->balance);
    return rc;
}

static int acc_state_decode(const uint8_t *p, size_t len, void *s,
                            es_error *err)
{
    bank_account *a = s;
    reader r = {p, len, false};
    get_str(&r, a->owner);
    get_str(&r, a->email);
    a->balance = get_i64(&r);
    return finish_read(&r, err);
}

static int acc_event_encode(const void *ev, es_buf *out, es_error *err)
{
    (void)err;
    const bank_account_event *e = ev;
    int rc = put_uuid(out, &e->id);
    if (rc == 0) rc = put_i64(out, e->amount);
    if (rc == 0) rc = put_i64(out, e->balance);
    switch (e->kind) {
    case BANK_OPENED:
        if (rc == 0) rc = put_str(out, e->owner);
        if (rc == 0) rc = put_str(out, e->email);
        return rc;
    case BANK_TRANSFER_DEBITED:
    case BANK_TRANSFER_CREDITED:
    case BANK_TRANSFER_REFUNDED:
        if (rc == 0) rc = put_uuid(out, &e->transfer_id);
        if (rc == 0) rc = put_uuid(out, &e->other);
        return rc;
    case BANK_DEPOSITED:
    case BANK_WITHDRAWN:
        return rc;
    }
    return ES_EINVAL;
}

static int acc_event_decode(int32_t kind, const uint8_t *p, size_t len,
                            void *ev, es_error *err)
{
    bank_account_event *e = ev;
    if (acc_kind_name(kind) == NULL) {
        snprintf(err->message, sizeof err->message, "unknown kind %d",
                 (int)kind);
        return ES_EDECODE;
    }
    e->kind = (bank_account_event_kind)kind;
    reader r = {p, len, false};
    get_uuid(&r, &e->id);
    e->amount = get_i64(&r);
    e->balance = get_i64(&r);
    switch (e->kind) {
    case BANK_OPENED:
        get_str(&r, e->owner);
        get_str(&r, e->email);
        break;
    case BANK_TRANSFER_DEBITED:
    case BANK_TRANSFER_CREDITED:
    case BANK_TRANSFER_REFUNDED:
        get_uuid(&r, &e->transfer_id);
        get_uuid(&r, &e->other);
        break;
    case BANK_DEPOSITED:
    case BANK_WITHDRAWN:
        break;
    }
    return finish_read(&r, err);
}

static es_uuid fx_id(const void *f) { return ((const bank_effect *)f)->id; }
static int32_t fx_kind(const void *f)
{
    return (int32_t)((const bank_effect *)f)->kind;
}

static int fx_encode(const void *f, es_buf *out, es_error *err)
{
    (void)err;
    const bank_effect *fx = f;
    int rc = put_uuid(out, &fx->id);
    switch (fx->kind) {
    case BANK_FX_WELCOME_EMAIL:
        return rc ? rc : put_str(out, fx->email);
    case BANK_FX_CREDIT:
        if (rc == 0) rc = put_uuid(out, &fx->transfer_id);
        if (rc == 0) rc = put_uuid(out, &fx->to);
        if (rc == 0) rc = put_i64(out, fx->amount);
        return rc;
    }
    return ES_EINVAL;
}

static int fx_decode(int32_t kind, const uint8_t *p, size_t len, void *f,
                     es_error *err)
{
    bank_effect *fx = f;
    reader r = {p, len, false};
    get_uuid(&r, &fx->id);
    switch ((bank_effect_kind)kind) {
    case BANK_FX_WELCOME_EMAIL:
        fx->kind = BANK_FX_WELCOME_EMAIL;
        get_str(&r, fx->email);
        return finish_read(&r, err);
    case BANK_FX_CREDIT:
        fx->kind = BANK_FX_CREDIT;
        get_uuid(&r, &fx->transfer_id);
        get_uuid(&r, &fx->to);
        fx->amount = get_i64(&r);
        return finish_read(&r, err);
    }
    snprintf(err->message, sizeof err->message, "unknown side-effect kind %d",
             (int)kind);
    return ES_EDECODE;
}

const es_aggregate_type bank_account_type = {
    .name = "bank_account",
    .snapshot_version = 1,
    .state_size = sizeof(bank_account),
    .event_size = sizeof(bank_account_event),
    .side_effect_size = sizeof(bank_effect),
    .event_id = acc_event_id,
    .event_kind = acc_event_kind,
    .event_kind_name = acc_kind_name,
    .apply_new = acc_apply_new,
    .apply = acc_apply,
    .side_effects = acc_side_effects,
    .state_encode = acc_state_encode,
    .state_decode = acc_state_decode,
    .event_encode = acc_event_encode,
    .event_decode = acc_event_decode,
    .side_effect_id = fx_id,
    .side_effect_kind = fx_kind,
    .side_effect_encode = fx_encode,
    .side_effect_decode = fx_decode,
};

/* ---- the transfer aggregate ---- */

static es_uuid tr_event_id(const void *e)
{
    return ((const bank_transfer_event *)e)->id;
}

static int32_t tr_event_kind(const void *e)
{
    return (int32_t)((const bank_transfer_event *)e)->kind;
}

static int tr_apply_new(void *state, const void *event, es_error *err)
{
    bank_transfer *t = state;
    const bank_transfer_event *e = event;
    switch (e->kind) {
    case BANK_TRANSFER_INITIATED:
        t->from = e->from;
        t->to = e->to;
        t->amount = e->amount;
        t->status = BANK_TS_PENDING;
        return 0;
    case BANK_TRANSFER_COMPLETED_EV:
    case BANK_TRANSFER_REFUNDED_EV:
        break;
    }
    return fail(err, "the first event must initiate the transfer");
}

static int tr_apply(void *state, const void *event, es_error *err)
{
    bank_transfer *t = state;
    const bank_transfer_event *e = event;
    switch (e->kind) {
    case BANK_TRANSFER_INITIATED:
        return fail(err, "already initiated");
    case BANK_TRANSFER_COMPLETED_EV:
        t->status = BANK_TS_COMPLETED;
        return 0;
    case BANK_TRANSFER_REFUNDED_EV:
        t->status = BANK_TS_REFUNDED;
        return 0;
    }
    return fail(err, "unknown event kind");
}

static int tr_state_encode(const void *s, es_buf *out, es_error *err)
{
    (void)err;
    const bank_transfer *t = s;
    int rc = put_uuid(out, &t->from);
    if (rc == 0) rc = put_uuid(out, &t->to);
    if (rc == 0) rc = put_i64(out, t->amount);
    if (rc == 0) rc = put_u8(out, (uint8_t)t->status);
    return rc;
}

static int tr_state_decode(const uint8_t *p, size_t len, void *s,
                           es_error *err)
{
    bank_transfer *t = s;
    reader r = {p, len, false};
    get_uuid(&r, &t->from);
    get_uuid(&r, &t->to);
    t->amount = get_i64(&r);
    uint8_t st = get_u8(&r);
    if (st > BANK_TS_REFUNDED) r.bad = true;
    t->status = (bank_transfer_status)st;
    return finish_read(&r, err);
}

static int tr_event_encode(const void *ev, es_buf *out, es_error *err)
{
    (void)err;
    const bank_transfer_event *e = ev;
    int rc = put_uuid(out, &e->id);
    if (rc == 0) rc = put_uuid(out, &e->from);
    if (rc == 0) rc = put_uuid(out, &e->to);
    if (rc == 0) rc = put_i64(out, e->amount);
    return rc;
}

static int tr_event_decode(int32_t kind, const uint8_t *p, size_t len,
                           void *ev, es_error *err)
{
    bank_transfer_event *e = ev;
    if (kind < BANK_TRANSFER_INITIATED || kind > BANK_TRANSFER_REFUNDED_EV) {
        snprintf(err->message, sizeof err->message, "unknown kind %d",
                 (int)kind);
        return ES_EDECODE;
    }
    e->kind = (bank_transfer_event_kind)kind;
    reader r = {p, len, false};
    get_uuid(&r, &e->id);
    get_uuid(&r, &e->from);
    get_uuid(&r, &e->to);
    e->amount = get_i64(&r);
    return finish_read(&r, err);
}

const es_aggregate_type bank_transfer_type = {
    .name = "bank_transfer",
    .snapshot_version = 1,
    .state_size = sizeof(bank_transfer),
    .event_size = sizeof(bank_transfer_event),
    .event_id = tr_event_id,
    .event_kind = tr_event_kind,
    .apply_new = tr_apply_new,
    .apply = tr_apply,
    .state_encode = tr_state_encode,
    .state_decode = tr_state_decode,
    .event_encode = tr_event_encode,
    .event_decode = tr_event_decode,
};

/* ---- commands ---- */

int bank_command_encode(const bank_command *c, es_buf *buf)
{
    int rc = put_u8(buf, (uint8_t)c->kind);
    if (rc == 0) rc = put_i64(buf, c->amount);
    if (rc == 0) rc = put_uuid(buf, &c->transfer_id);
    if (rc == 0) rc = put_uuid(buf, &c->other);
    if (rc == 0) rc = put_str(buf, c->owner);
    if (rc == 0) rc = put_str(buf, c->email);
    return rc;
}

int bank_command_decode(const uint8_t *p, size_t len, bank_command *c)
{
    memset(c, 0, sizeof *c);
    reader r = {p, len, false};
    c->kind = (bank_command_kind)get_u8(&r);
    c->amount = get_i64(&r);
    get_uuid(&r, &c->transfer_id);
    get_uuid(&r, &c->other);
    get_str(&r, c->owner);
    get_str(&r, c->email);
    return finish_read(&r, NULL);
}

es_uuid bank_derive_id(const es_uuid *base, const char *label)
{
    uint8_t in[16 + 64];
    size_t n = strnlen(label, 64);
    memcpy(in, base->bytes, 16);
    memcpy(in + 16, label, n);
    es_uuid id;
    crypto_generichash(id.bytes, 16, in, 16 + n, NULL, 0);
    id.bytes[6] = (uint8_t)((id.bytes[6] & 0x0f) | 0x80); /* v8: custom */
    id.bytes[8] = (uint8_t)((id.bytes[8] & 0x3f) | 0x80);
    return id;
}

static int emit_account(es_emitter *em, bank_account_event *e)
{
    int rc = es_uuid_v7(&e->id);
    return rc ? rc : es_emit(em, e);
}

int bank_account_decide(void *user, const void *state,
                        const es_command *command, es_emitter *em)
{
    (void)user;
    const bank_account *a = state;
    bank_command c;
    if (bank_command_decode(command->payload, command->len, &c) != 0 ||
        (int32_t)c.kind != command->kind)
        return es_emit_reject(em, BANK_REJECT_INVALID);
    bank_account_event e;
    memset(&e, 0, sizeof e);
    e.amount = c.amount;
    switch (c.kind) {
    case BANK_CMD_OPEN:
        if (a != NULL) return es_emit_reject(em, BANK_REJECT_EXISTS);
        if (c.amount < 0) return es_emit_reject(em, BANK_REJECT_INVALID);
        e.kind = BANK_OPENED;
        e.balance = c.amount;
        memcpy(e.owner, c.owner, sizeof e.owner);
        memcpy(e.email, c.email, sizeof e.email);
        return emit_account(em, &e);
    case BANK_CMD_DEPOSIT:
    case BANK_CMD_CREDIT:
    case BANK_CMD_REFUND:
        if (a == NULL) return es_emit_reject(em, BANK_REJECT_NOT_FOUND);
        if (c.amount <= 0) return es_emit_reject(em, BANK_REJECT_INVALID);
        if (a->balance > INT64_MAX - c.amount)
            return es_emit_reject(em, BANK_REJECT_OVERFLOW);
        e.balance = a->balance + c.amount;
        e.kind = c.kind == BANK_CMD_DEPOSIT  ? BANK_DEPOSITED
                 : c.kind == BANK_CMD_CREDIT ? BANK_TRANSFER_CREDITED
                                             : BANK_TRANSFER_REFUNDED;
        e.transfer_id = c.transfer_id;
        e.other = c.other;
        return emit_account(em, &e);
    case BANK_CMD_WITHDRAW:
    case BANK_CMD_DEBIT:
        if (a == NULL) return es_emit_reject(em, BANK_REJECT_NOT_FOUND);
        if (c.amount <= 0) return es_emit_reject(em, BANK_REJECT_INVALID);
        if (c.amount > a->balance)
            return es_emit_reject(em, BANK_REJECT_INSUFFICIENT);
        e.balance = a->balance - c.amount;
        e.kind = c.kind == BANK_CMD_WITHDRAW ? BANK_WITHDRAWN
                                             : BANK_TRANSFER_DEBITED;
        e.transfer_id = c.transfer_id;
        e.other = c.other;
        return emit_account(em, &e);
    case BANK_CMD_INITIATE:
    case BANK_CMD_COMPLETE:
    case BANK_CMD_MARK_REFUNDED:
        break;
    }
    return es_emit_reject(em, BANK_REJECT_INVALID);
}

int bank_transfer_decide(void *user, const void *state,
                         const es_command *command, es_emitter *em)
{
    (void)user;
    const bank_transfer *t = state;
    bank_command c;
    if (bank_command_decode(command->payload, command->len, &c) != 0 ||
        (int32_t)c.kind != command->kind)
        return es_emit_reject(em, BANK_REJECT_INVALID);
    bank_transfer_event e;
    memset(&e, 0, sizeof e);
    switch (c.kind) {
    case BANK_CMD_INITIATE:
        if (t != NULL) return 0; /* already known: nothing to record */
        e.kind = BANK_TRANSFER_INITIATED;
        e.from = c.other;
        e.to = c.transfer_id; /* the destination rides in transfer_id */
        e.amount = c.amount;
        break;
    case BANK_CMD_COMPLETE:
    case BANK_CMD_MARK_REFUNDED:
        if (t == NULL) return es_emit_reject(em, BANK_REJECT_NOT_FOUND);
        if (t->status != BANK_TS_PENDING) return 0; /* settled */
        e.kind = c.kind == BANK_CMD_COMPLETE ? BANK_TRANSFER_COMPLETED_EV
                                             : BANK_TRANSFER_REFUNDED_EV;
        break;
    case BANK_CMD_OPEN:
    case BANK_CMD_DEPOSIT:
    case BANK_CMD_WITHDRAW:
    case BANK_CMD_DEBIT:
    case BANK_CMD_CREDIT:
    case BANK_CMD_REFUND:
        return es_emit_reject(em, BANK_REJECT_INVALID);
    }
    int rc = es_uuid_v7(&e.id);
    return rc ? rc : es_emit(em, &e);
}

int bank_register(es_host_config *cfg, es_error *err)
{
    int rc = es_host_config_add_type(cfg, &bank_account_type,
                                     bank_account_decide, NULL, err);
    if (rc == 0)
        rc = es_host_config_add_type(cfg, &bank_transfer_type,
                                     bank_transfer_decide, NULL, err);
    return rc;
}

int bank_call(es_host *host, const es_aggregate_type *type,
              const es_uuid *key, const es_uuid *command_id,
              const bank_command *cmd, es_host_reply **reply, es_error *err)
{
    es_buf buf = {0};
    if (bank_command_encode(cmd, &buf) != 0) {
        es_buf_free(&buf);
        return ES_ENOMEM;
    }
    es_command c = {*command_id, (int32_t)cmd->kind, buf.data, buf.len};
    int rc = es_host_call(host, type, key, &c, reply, err);
    es_buf_free(&buf);
    return rc;
}

/* ---- the saga ---- */

/* Can retrying change this outcome?  Everything else is final: a
 * rejection, and the permanent failures (ES_EINVAL for an id the library
 * refuses, ES_EWRONGTYPE or ES_EDECODE for an id stored as the other
 * aggregate type, ES_ENOTFOUND, ES_EIDEMPOTENCY for a command id taken by
 * another command, ...). */
static bool transient(int status)
{
    return status == ES_EBUSY || status == ES_ECONFLICT || status == ES_EDB ||
           status == ES_ECLOSED || status == ES_ETIMEDOUT ||
           status == ES_EUNKNOWN || status == ES_ENOMEM || status == ES_EIO;
}

/* One saga step: a command with an id derived from the transfer id, so a
 * second delivery is answered as a duplicate.  Returns false when the
 * outcome may change on a retry (the delivery is retried); true when it
 * is final, with *status 0 or the failure, whose text is in reason. */
static bool step(es_host *host, const es_aggregate_type *type,
                 const es_uuid *key, const es_uuid *tid, const char *label,
                 const bank_command *cmd, int *status, es_error *reason)
{
    es_uuid cid = bank_derive_id(tid, label);
    es_host_reply *reply = NULL;
    es_error err = {0};
    int rc = bank_call(host, type, key, &cid, cmd, &reply, &err);
    *status = rc;
    if (rc == ES_EREJECTED && reply != NULL)
        snprintf(reason->message, sizeof reason->message, "%.20s: %.200s",
                 label, reply->reason);
    else if (rc != 0)
        snprintf(reason->message, sizeof reason->message, "%.20s: %s: %.200s",
                 label, es_status_name(rc),
                 reply ? reply->reason : err.message);
    es_host_reply_free(reply);
    return !transient(rc);
}

/* The credit side effect: record the transfer, credit the destination,
 * complete; or, when a step fails for good (the transfer id names an
 * account, the destination is unknown, of the other type or refuses),
 * refund the source and mark the transfer refunded.  The debit committed
 * before this runs, so only a failure of the refund itself gives up: the
 * message becomes a dead letter, listed in /metrics and by the outbox
 * tool, and its money is held by nobody until it is requeued. */
es_outbox_verdict bank_effect_handler(void *ud, const es_outbox_entry *entry,
                                      const void *side_effect,
                                      es_error *reason)
{
    es_host *host = ud;
    const bank_effect *fx = side_effect;
    char text[ES_UUID_STRLEN + 1];
    switch (fx->kind) {
    case BANK_FX_WELCOME_EMAIL:
        /* A real service would send it, with fx->id as its message id. */
        (void)entry;
        return ES_OUTBOX_VERDICT_DONE;
    case BANK_FX_CREDIT:
        break;
    }
    const es_uuid *tid = &fx->transfer_id;
    const es_uuid *from = &entry->side_effect.aggregate_id;
    int st = 0;
    bank_command c;
    memset(&c, 0, sizeof c);
    c.kind = BANK_CMD_INITIATE;
    c.other = *from;
    c.transfer_id = fx->to;
    c.amount = fx->amount;
    if (!step(host, &bank_transfer_type, tid, tid, "initiate", &c, &st,
              reason))
        return ES_OUTBOX_VERDICT_RETRY;
    /* Not recorded (the transfer id names an account): nothing to mark,
     * but the money still goes back. */
    bool recorded = st == 0;
    bool credited = false;
    if (recorded) {
        memset(&c, 0, sizeof c);
        c.kind = BANK_CMD_CREDIT;
        c.amount = fx->amount;
        c.transfer_id = *tid;
        c.other = *from;
        if (!step(host, &bank_account_type, &fx->to, tid, "credit", &c, &st,
                  reason))
            return ES_OUTBOX_VERDICT_RETRY;
        credited = st == 0;
    }
    if (!credited) { /* the money goes back */
        memset(&c, 0, sizeof c);
        c.kind = BANK_CMD_REFUND;
        c.amount = fx->amount;
        c.transfer_id = *tid;
        c.other = fx->to;
        if (!step(host, &bank_account_type, from, tid, "refund", &c, &st,
                  reason))
            return ES_OUTBOX_VERDICT_RETRY;
        if (st != 0) {
            size_t n = strlen(reason->message);
            snprintf(reason->message + n, sizeof reason->message - n,
                     " (refund of transfer %s)", es_uuid_format(tid, text));
            /* A rejected refund (the source's balance would overflow)
             * may pass later; other failures are for good. */
            return st == ES_EREJECTED ? ES_OUTBOX_VERDICT_RETRY
                                      : ES_OUTBOX_VERDICT_GIVE_UP;
        }
    }
    if (!recorded) return ES_OUTBOX_VERDICT_DONE;
    memset(&c, 0, sizeof c);
    c.kind = credited ? BANK_CMD_COMPLETE : BANK_CMD_MARK_REFUNDED;
    if (!step(host, &bank_transfer_type, tid, tid,
              credited ? "complete" : "mark-refunded", &c, &st, reason))
        return ES_OUTBOX_VERDICT_RETRY;
    return st == 0 ? ES_OUTBOX_VERDICT_DONE : ES_OUTBOX_VERDICT_RETRY;
}
