import { useEffect, useMemo, useState } from "preact/hooks";
import { create } from "@bufbuild/protobuf";
import { problem, production, validate, type Problem } from "../api";
import { OrderState, OrderSchema, BookingSchema, DefectSchema, BookingSource, type Order } from "../gen/fabrica/production/v1/order_pb";
import { CreateOrderRequestSchema, CreateBookingRequestSchema, CreateDefectRequestSchema } from "../gen/fabrica/production/v1/production_service_pb";
import { pct, STATE_WORDS, timeText } from "../format";
import { useOrderBoard } from "../live";
import { Allowed, Card, codeName, Empty, ErrorBanner, Field, itemName, Progress, StreamBadge, useLoad, useNames, wcName } from "../ui";

const COLUMNS: [OrderState, string][] = [
  [OrderState.PLANNED, "Planned"],
  [OrderState.IN_PROGRESS, "In progress"],
  [OrderState.PAUSED, "Paused"],
  [OrderState.COMPLETED, "Completed"],
  [OrderState.CANCELLED, "Cancelled"],
];

type Action = "start" | "pause" | "resume" | "complete" | "cancel";
const ACTIONS: Record<OrderState, Action[]> = {
  [OrderState.UNSPECIFIED]: [],
  [OrderState.PLANNED]: ["start", "cancel"],
  [OrderState.IN_PROGRESS]: ["pause", "complete", "cancel"],
  [OrderState.PAUSED]: ["resume", "complete", "cancel"],
  [OrderState.COMPLETED]: [],
  [OrderState.CANCELLED]: [],
};
const ACTION_WORDS: Record<Action, string> = { start: "Start", pause: "Pause", resume: "Resume", complete: "Complete", cancel: "Cancel" };

async function act(o: Order, a: Action): Promise<void> {
  const req = { id: o.id, etag: o.etag };
  switch (a) {
    case "start": await production.startOrder(req); break;
    case "pause": await production.pauseOrder(req); break;
    case "resume": await production.resumeOrder(req); break;
    case "complete": await production.completeOrder(req); break;
    case "cancel": await production.cancelOrder({ ...req, reason: "cancelled on the order board" }); break;
  }
}

function OrderCard({ o, onOpen, selected }: { o: Order; onOpen: () => void; selected: boolean }) {
  const names = useNames();
  const [err, setErr] = useState<Problem | null>(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => setErr(null), [o.etag]); // an error is about the order as it was
  const run = async (a: Action) => {
    if (a === "cancel" && !confirm(`Cancel order ${o.number}?`)) return;
    setBusy(true);
    try { await act(o, a); setErr(null); } catch (e) { setErr(problem(e)); } finally { setBusy(false); }
  };
  return (
    <article class={`order-card ${selected ? "selected" : ""}`} data-order={o.number} onClick={onOpen}>
      <div class="order-card-head">
        <strong>{o.number}</strong>
        <span class="muted small">{wcName(names, o.workCenterId)}</span>
      </div>
      <div class="muted small">{itemName(names, o.itemId)}</div>
      <Progress good={o.goodQuantity} scrap={o.scrapQuantity} planned={o.plannedQuantity} />
      <div class="order-card-counts small" data-testid="progress-text">
        <span class="text-ok">{o.goodQuantity.toString()} good</span> · <span class="text-bad">{o.scrapQuantity.toString()} scrap</span> · {o.plannedQuantity.toString()} planned
      </div>
      <Allowed role="operator">
        {ACTIONS[o.state].length > 0 && (
          <div class="order-actions" onClick={(e) => e.stopPropagation()}>
            {ACTIONS[o.state].map((a) => (
              <button class={`btn small ${a === "start" || a === "resume" ? "primary" : a === "cancel" ? "danger-ghost" : ""}`} disabled={busy} onClick={() => run(a)} data-action={a}>{ACTION_WORDS[a]}</button>
            ))}
          </div>
        )}
      </Allowed>
      {err && <div class="banner error small" role="alert" data-testid="order-error">{err.message}</div>}
    </article>
  );
}

function CreateOrder({ onDone }: { onDone: () => void }) {
  const names = useNames();
  const [form, setForm] = useState({ number: "", itemId: "", workCenterId: "", planned: "100" });
  const [err, setErr] = useState<Problem | null>(null);
  const submit = async (e: Event) => {
    e.preventDefault();
    const planned = /^\d+$/.test(form.planned.trim()) ? BigInt(form.planned.trim()) : -1n;
    const req = create(CreateOrderRequestSchema, {
      order: create(OrderSchema, { number: form.number.trim(), itemId: form.itemId, workCenterId: form.workCenterId, plannedQuantity: planned }),
      requestId: crypto.randomUUID(),
    });
    const local = await validate(CreateOrderRequestSchema, req);
    if (local) { setErr(local); return; }
    try { await production.createOrder(req); setErr(null); onDone(); } catch (e2) { setErr(problem(e2)); }
  };
  return (
    <form class="form" onSubmit={submit} data-testid="create-order">
      <ErrorBanner p={err} />
      <div class="form-row">
        <Field label="Order number" path="order.number" p={err}>
          <input class="input" name="number" value={form.number} onInput={(e) => setForm({ ...form, number: e.currentTarget.value })} placeholder="e.g. PO-24017" />
        </Field>
        <Field label="Item" path="order.item_id" p={err}>
          <select class="input" name="item" value={form.itemId} onChange={(e) => setForm({ ...form, itemId: e.currentTarget.value })}>
            <option value="">Choose…</option>
            {[...(names?.items.values() ?? [])].map((i) => <option value={i.id}>{i.displayName}</option>)}
          </select>
        </Field>
        <Field label="Work centre" path="order.work_center_id" p={err}>
          <select class="input" name="workCenter" value={form.workCenterId} onChange={(e) => setForm({ ...form, workCenterId: e.currentTarget.value })}>
            <option value="">Choose…</option>
            {[...(names?.workCenters.values() ?? [])].map((w) => <option value={w.id}>{w.displayName}</option>)}
          </select>
        </Field>
        <Field label="Planned good parts" path="order.planned_quantity" p={err}>
          <input class="input" name="planned" inputMode="numeric" value={form.planned} onInput={(e) => setForm({ ...form, planned: e.currentTarget.value })} />
        </Field>
      </div>
      <div class="form-actions"><button class="btn primary" type="submit">Create order</button><button class="btn ghost" type="button" onClick={onDone}>Close</button></div>
    </form>
  );
}

function OrderDetail({ o, onClose }: { o: Order; onClose: () => void }) {
  const names = useNames();
  const bookings = useLoad(() => production.listBookings({ orderId: o.id, pageSize: 200 }), [o.id, o.etag]);
  const defects = useLoad(() => production.listDefects({ orderId: o.id, pageSize: 200 }), [o.id, o.etag]);
  const oee = useLoad(() => production.getOee({ subject: { case: "orderId", value: o.id } }), [o.id, o.etag]);
  const [defect, setDefect] = useState({ code: "", qty: "1", note: "" });
  const [booking, setBooking] = useState({ good: "0", scrap: "0", note: "" });
  const [dErr, setDErr] = useState<Problem | null>(null);
  const [bErr, setBErr] = useState<Problem | null>(null);
  const [okMsg, setOk] = useState("");
  const int = (s: string) => (/^-?\d+$/.test(s.trim()) ? BigInt(s.trim()) : NaN);

  const recordDefect = async (e: Event) => {
    e.preventDefault();
    const q = int(defect.qty);
    if (typeof q !== "bigint") { setDErr({ code: 3, message: "", fields: { "defect.quantity": "Enter a whole number of parts." } }); return; }
    const req = create(CreateDefectRequestSchema, { defect: create(DefectSchema, { orderId: o.id, defectCodeId: defect.code, quantity: q, note: defect.note }), requestId: crypto.randomUUID() });
    const local = await validate(CreateDefectRequestSchema, req);
    if (local) { setDErr(local); return; }
    try { await production.createDefect(req); setDErr(null); setOk("Defect recorded."); defects.reload(); } catch (e2) { setDErr(problem(e2)); }
  };
  const book = async (e: Event) => {
    e.preventDefault();
    const g = int(booking.good), s = int(booking.scrap);
    if (typeof g !== "bigint" || typeof s !== "bigint") {
      setBErr({ code: 3, message: "", fields: typeof g !== "bigint" ? { "booking.good_quantity": "Enter a whole number." } : { "booking.scrap_quantity": "Enter a whole number." } });
      return;
    }
    const req = create(CreateBookingRequestSchema, { booking: create(BookingSchema, { orderId: o.id, goodQuantity: g, scrapQuantity: s, note: booking.note, source: BookingSource.MANUAL }), requestId: crypto.randomUUID() });
    const local = await validate(CreateBookingRequestSchema, req);
    if (local) { setBErr(local); return; }
    try { await production.createBooking(req); setBErr(null); setOk("Booking saved."); bookings.reload(); } catch (e2) { setBErr(problem(e2)); }
  };
  const ox = oee.data?.oee;
  return (
    <Card title={<>Order {o.number} <span class={`pill state-${o.state}`}>{STATE_WORDS[o.state]}</span></>} actions={<button class="btn ghost small" onClick={onClose}>Close</button>} testid="order-detail">
      <dl class="facts">
        <dt>Item</dt><dd>{itemName(names, o.itemId)}</dd>
        <dt>Work centre</dt><dd>{wcName(names, o.workCenterId)}</dd>
        <dt>Started</dt><dd>{timeText(o.startTime)}</dd>
        <dt>Ended</dt><dd>{timeText(o.endTime)}</dd>
        <dt>OEE</dt><dd>{ox ? <>{pct(ox.oee)} <span class="muted">(availability {pct(ox.availability)}, performance <span class={ox.performance > 1.0001 ? "text-bad" : ""}>{pct(ox.performance)}</span>, quality {pct(ox.quality)})</span></> : "—"}
          {ox && ox.performance > 1.0001 && <div class="text-bad small">Performance above 100 %: the item's ideal cycle time is set too slow.</div>}</dd>
      </dl>
      {okMsg && <div class="banner ok small">{okMsg}</div>}
      <Allowed role="operator">
        <div class="grid-2">
          <form class="form" onSubmit={recordDefect} data-testid="record-defect">
            <h3>Record a defect</h3>
            <ErrorBanner p={dErr} />
            <Field label="Defect" path="defect.defect_code_id" p={dErr}>
              <select class="input" value={defect.code} onChange={(e) => setDefect({ ...defect, code: e.currentTarget.value })}>
                <option value="">Choose…</option>
                {[...(names?.defectCodes.values() ?? [])].map((c) => <option value={c.id}>{c.displayName}</option>)}
              </select>
            </Field>
            <Field label="Parts" path="defect.quantity" p={dErr}><input class="input" inputMode="numeric" value={defect.qty} onInput={(e) => setDefect({ ...defect, qty: e.currentTarget.value })} /></Field>
            <Field label="Note" path="defect.note" p={dErr}><input class="input" value={defect.note} onInput={(e) => setDefect({ ...defect, note: e.currentTarget.value })} /></Field>
            <button class="btn" type="submit">Record defect</button>
          </form>
          <form class="form" onSubmit={book} data-testid="manual-booking">
            <h3>Manual booking</h3>
            <ErrorBanner p={bErr} />
            <div class="form-row">
              <Field label="Good parts" path="booking.good_quantity" p={bErr}><input class="input" inputMode="numeric" value={booking.good} onInput={(e) => setBooking({ ...booking, good: e.currentTarget.value })} /></Field>
              <Field label="Scrap parts" path="booking.scrap_quantity" p={bErr}><input class="input" inputMode="numeric" value={booking.scrap} onInput={(e) => setBooking({ ...booking, scrap: e.currentTarget.value })} /></Field>
            </div>
            <Field label="Note" path="booking.note" p={bErr}><input class="input" value={booking.note} onInput={(e) => setBooking({ ...booking, note: e.currentTarget.value })} /></Field>
            <button class="btn" type="submit">Book</button>
          </form>
        </div>
      </Allowed>
      <div class="grid-2">
        <div>
          <h3>Defects</h3>
          {(defects.data?.defects.length ?? 0) === 0 ? <Empty>None recorded.</Empty> : (
            <table class="table compact"><thead><tr><th>When</th><th>Defect</th><th class="num">Parts</th><th>Note</th></tr></thead>
              <tbody>{defects.data!.defects.map((d) => <tr><td>{timeText(d.createTime)}</td><td>{codeName(names, d.defectCodeId)}</td><td class="num">{d.quantity.toString()}</td><td>{d.note}</td></tr>)}</tbody></table>
          )}
        </div>
        <div>
          <h3>Bookings</h3>
          {(bookings.data?.bookings.length ?? 0) === 0 ? <Empty>None yet.</Empty> : (
            <div class="vscroll" style={{ maxHeight: "260px" }}>
              <table class="table compact"><thead><tr><th>When</th><th>Source</th><th class="num">Good</th><th class="num">Scrap</th></tr></thead>
                <tbody>{bookings.data!.bookings.slice().reverse().map((b) => <tr><td>{timeText(b.bookTime)}</td><td>{b.source === BookingSource.MANUAL ? `manual${b.note ? `: ${b.note}` : ""}` : "counter"}</td><td class="num">{b.goodQuantity.toString()}</td><td class="num">{b.scrapQuantity.toString()}</td></tr>)}</tbody></table>
            </div>
          )}
        </div>
      </div>
    </Card>
  );
}

export function Orders() {
  const board = useOrderBoard();
  const names = useNames();
  const [creating, setCreating] = useState(false);
  const [openId, setOpenId] = useState<string | null>(null);
  const [wc, setWc] = useState("");
  const byState = useMemo(() => {
    const m = new Map<OrderState, Order[]>();
    for (const o of board.orders.values()) {
      if (wc && o.workCenterId !== wc) continue;
      const l = m.get(o.state) ?? [];
      l.push(o);
      m.set(o.state, l);
    }
    for (const l of m.values()) l.sort((a, b) => b.number.localeCompare(a.number));
    return m;
  }, [board, wc]);
  const open = openId ? board.orders.get(openId) : undefined;
  return (
    <div class="page">
      <div class="page-head">
        <h1>Orders</h1>
        <StreamBadge state={board.state} why={board.why} />
        <div class="spacer" />
        <select class="input" value={wc} onChange={(e) => setWc(e.currentTarget.value)} aria-label="Work centre">
          <option value="">All work centres</option>
          {[...(names?.workCenters.values() ?? [])].map((w) => <option value={w.id}>{w.displayName}</option>)}
        </select>
        <Allowed role="operator"><button class="btn primary" onClick={() => setCreating(true)} data-testid="new-order">New order</button></Allowed>
      </div>
      {board.state === "reconnecting" && <div class="banner warn">The live board is reconnecting; it will catch up from revision {board.revision.toString()}. {board.why}</div>}
      {creating && <Card title="New order"><CreateOrder onDone={() => setCreating(false)} /></Card>}
      {open && <OrderDetail o={open} onClose={() => setOpenId(null)} />}
      <div class="board" data-testid="order-board">
        {COLUMNS.map(([state, title]) => (
          <div class="board-col" data-state={STATE_WORDS[state]}>
            <h2 class="board-col-head">{title} <span class="count">{byState.get(state)?.length ?? 0}</span></h2>
            {(byState.get(state) ?? []).slice(0, 50).map((o) => <OrderCard key={o.id} o={o} selected={o.id === openId} onOpen={() => setOpenId(o.id)} />)}
            {(byState.get(state)?.length ?? 0) > 50 && <div class="muted small">and {(byState.get(state)!.length - 50)} more</div>}
          </div>
        ))}
      </div>
    </div>
  );
}
