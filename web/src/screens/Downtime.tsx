import { useMemo, useState } from "preact/hooks";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { problem, production, validate, type Problem } from "../api";
import { DowntimeSchema, OrderState, type Downtime as DowntimeMsg, type Oee } from "../gen/fabrica/production/v1/order_pb";
import { CreateDowntimeRequestSchema } from "../gen/fabrica/production/v1/production_service_pb";
import { durationWords, pct, timeText, tsDate } from "../format";
import { useOrderBoard } from "../live";
import { Allowed, Card, Empty, ErrorBanner, Field, reasonName, useLoad, useNames, useNow, wcName, type Names } from "../ui";

const WINDOWS: [string, number][] = [["8 h", 8 * 3600], ["24 h", 86400], ["7 days", 7 * 86400], ["30 days", 30 * 86400]];

function seconds(d: DowntimeMsg, now: number): number {
  const s = tsDate(d.startTime)?.getTime() ?? now;
  const e = tsDate(d.endTime)?.getTime() ?? now;
  return Math.max(0, (e - s) / 1000);
}

function OeeTiles({ oee, title, testid }: { oee: Oee | undefined; title: string; testid: string }) {
  const tooFast = !!oee && oee.performance > 1.0001;
  return (
    <Card title={title} testid={testid}>
      {!oee ? <Empty>—</Empty> : (
        <>
          <div class="oee">
            <div class="oee-main"><span class="tile-label">OEE</span><span class="tile-value">{pct(oee.oee)}</span></div>
            <div><span class="tile-label">Availability</span><span class="tile-value small">{pct(oee.availability)}</span></div>
            <div class={tooFast ? "oee-flag" : ""}><span class="tile-label">Performance</span><span class="tile-value small" data-testid="performance">{pct(oee.performance)}</span></div>
            <div><span class="tile-label">Quality</span><span class="tile-value small">{pct(oee.quality)}</span></div>
          </div>
          {tooFast && <div class="banner warn small" data-testid="cycle-time-flag">Performance above 100 % means the machine ran faster than the item's ideal cycle time allows: the ideal cycle time is set too slow. Correct it under Configuration → Items.</div>}
          <div class="muted small">{oee.goodCount.toString()} good of {oee.totalCount.toString()} parts · {oee.downtimeSeconds > 0 ? `${durationWords(oee.downtimeSeconds)} down` : "no downtime"} in {durationWords(oee.plannedSeconds)} planned</div>
        </>
      )}
    </Card>
  );
}

function Pareto({ rows, names }: { rows: DowntimeMsg[]; names: Names | null }) {
  const now = useNow(5000);
  const bars = useMemo(() => {
    const by = new Map<string, number>();
    for (const d of rows) by.set(d.reasonId, (by.get(d.reasonId) ?? 0) + seconds(d, now));
    const list = [...by.entries()].sort((a, b) => b[1] - a[1]);
    const total = list.reduce((s, [, v]) => s + v, 0) || 1;
    let cum = 0;
    return list.map(([id, v]) => { cum += v; return { id, v, cum: cum / total }; });
  }, [rows, now]);
  if (!bars.length) return <Empty>No downtime in this window.</Empty>;
  const max = bars[0].v || 1;
  return (
    <div class="pareto" data-testid="pareto">
      {bars.map((b) => {
        const r = names?.reasons.get(b.id);
        return (
          <div class="pareto-row" data-reason={reasonName(names, b.id)}>
            <span class="pareto-label">{reasonName(names, b.id)}</span>
            <span class="pareto-bar-wrap"><span class="pareto-bar" style={{ width: `${(b.v / max) * 100}%`, background: r?.color || "#94a3b8" }} /></span>
            <span class="pareto-val">{durationWords(b.v)}</span>
            <span class="pareto-cum muted">{(b.cum * 100).toFixed(0)} %</span>
          </div>
        );
      })}
    </div>
  );
}

function Classify({ d, onDone }: { d: DowntimeMsg; onDone: () => void }) {
  const names = useNames();
  const [err, setErr] = useState<Problem | null>(null);
  const pick = async (reasonId: string) => {
    if (!reasonId) return;
    try { await production.classifyDowntime({ id: d.id, reasonId, note: d.note }); setErr(null); onDone(); } catch (e) { setErr(problem(e)); }
  };
  return (
    <span class="classify">
      <select class="input small" value={d.reasonId} onChange={(e) => pick(e.currentTarget.value)} aria-label="Reason" data-testid="classify">
        <option value="">{d.reasonId ? "" : "Classify…"}</option>
        {[...(names?.reasons.values() ?? [])].map((r) => <option value={r.id}>{r.displayName}</option>)}
      </select>
      {err && <span class="field-error">{err.message}</span>}
    </span>
  );
}

function EndStop({ d, onDone }: { d: DowntimeMsg; onDone: () => void }) {
  const [err, setErr] = useState<Problem | null>(null);
  if (d.automatic || tsDate(d.endTime)) return null;
  const end = async () => {
    try { await production.endDowntime({ id: d.id }); setErr(null); onDone(); } catch (e) { setErr(problem(e)); }
  };
  return (
    <span class="classify">
      <button class="btn small primary" onClick={end} data-testid="end-downtime">Running again</button>
      {err && <span class="field-error">{err.fields.end_time ?? err.message}</span>}
    </span>
  );
}

function NewDowntime({ wc, onDone }: { wc: string; onDone: () => void }) {
  const names = useNames();
  const [form, setForm] = useState({ start: "", end: "", reason: "", note: "" });
  const [err, setErr] = useState<Problem | null>(null);
  const submit = async (e: Event) => {
    e.preventDefault();
    const s = form.start ? new Date(form.start).getTime() : NaN, en = form.end ? new Date(form.end).getTime() : NaN;
    if (!Number.isFinite(s)) { setErr({ code: 3, message: "", fields: { "downtime.start_time": "Enter when the stop began." } }); return; }
    const req = create(CreateDowntimeRequestSchema, {
      downtime: create(DowntimeSchema, {
        workCenterId: wc, startTime: timestampFromMs(s), endTime: Number.isFinite(en) ? timestampFromMs(en) : undefined,
        reasonId: form.reason, note: form.note,
      }),
    });
    const local = await validate(CreateDowntimeRequestSchema, req);
    if (local) { setErr(local); return; }
    try { await production.createDowntime(req); setErr(null); onDone(); } catch (e2) { setErr(problem(e2)); }
  };
  return (
    <form class="form" onSubmit={submit} data-testid="new-downtime">
      <ErrorBanner p={err} />
      <div class="form-row">
        <Field label="Began" path="downtime.start_time" p={err}><input class="input" type="datetime-local" value={form.start} onInput={(e) => setForm({ ...form, start: e.currentTarget.value })} /></Field>
        <Field label="Ended" path="downtime.end_time" p={err} hint="Empty while still down"><input class="input" type="datetime-local" value={form.end} onInput={(e) => setForm({ ...form, end: e.currentTarget.value })} /></Field>
        <Field label="Reason" path="downtime.reason_id" p={err}>
          <select class="input" value={form.reason} onChange={(e) => setForm({ ...form, reason: e.currentTarget.value })}>
            <option value="">Unclassified</option>
            {[...(names?.reasons.values() ?? [])].map((r) => <option value={r.id}>{r.displayName}</option>)}
          </select>
        </Field>
        <Field label="Note" path="downtime.note" p={err}><input class="input" value={form.note} onInput={(e) => setForm({ ...form, note: e.currentTarget.value })} /></Field>
      </div>
      <div class="form-actions"><button class="btn primary" type="submit">Record stop</button><button class="btn ghost" type="button" onClick={onDone}>Close</button></div>
    </form>
  );
}

export function Downtime({ params }: { params: URLSearchParams }) {
  const names = useNames();
  const now = useNow(1000);
  const wcs = [...(names?.workCenters.values() ?? [])];
  const wc = params.get("wc") || wcs[0]?.id || "";
  const [win, setWin] = useState(8 * 3600);
  const [adding, setAdding] = useState(false);
  const board = useOrderBoard(wc);
  const running = [...board.orders.values()].find((o) => o.state === OrderState.IN_PROGRESS || o.state === OrderState.PAUSED);
  const list = useLoad(async () => {
    if (!wc) return [];
    const start = timestampFromMs(Date.now() - win * 1000);
    const out: DowntimeMsg[] = [];
    let token = "";
    do {
      const r = await production.listDowntimes({ workCenterId: wc, startTime: start, pageSize: 1000, pageToken: token });
      out.push(...r.downtimes);
      token = r.nextPageToken;
    } while (token && out.length < 5000);
    return out;
  }, [wc, win], 5000);
  const wcOee = useLoad(() => (wc ? production.getOee({ subject: { case: "workCenterId", value: wc }, startTime: timestampFromMs(Date.now() - win * 1000) }) : Promise.resolve(undefined)), [wc, win], 10000);
  const orderOee = useLoad(() => (running ? production.getOee({ subject: { case: "orderId", value: running.id } }) : Promise.resolve(undefined)), [running?.id], 10000);
  const rows = list.data ?? [];
  const openRows = rows.filter((d) => !tsDate(d.endTime));
  const past = rows.filter((d) => tsDate(d.endTime));
  const [page, setPage] = useState(0);
  const PAGE = 25;

  const table = (items: DowntimeMsg[], testid: string) => (
    <table class="table" data-testid={testid}>
      <thead><tr><th>Began</th><th>Duration</th><th>Reason</th><th>Source</th><th>Note</th></tr></thead>
      <tbody>
        {items.map((d) => {
          const r = names?.reasons.get(d.reasonId);
          return (
            <tr data-downtime={d.id}>
              <td>{timeText(d.startTime)}</td>
              <td>{durationWords(seconds(d, now))}{!tsDate(d.endTime) && <> <span class="pill q-2">still down</span>
                <Allowed role="operator"><EndStop d={d} onDone={() => list.reload()} /></Allowed></>}</td>
              <td><span class="reason-swatch" style={{ background: r?.color || "#cbd5e1" }} /> {reasonName(names, d.reasonId)}
                <Allowed role="operator"><Classify d={d} onDone={() => list.reload()} /></Allowed></td>
              <td class="muted">{d.automatic ? "machine state" : "entered by hand"}</td>
              <td>{d.note}</td>
            </tr>
          );
        })}
      </tbody>
    </table>
  );

  return (
    <div class="page">
      <div class="page-head">
        <h1>Downtime</h1>
        <select class="input" value={wc} onChange={(e) => (location.hash = `#/downtime?wc=${encodeURIComponent(e.currentTarget.value)}`)} aria-label="Work centre" data-testid="wc-select">
          {wcs.map((w) => <option value={w.id}>{w.displayName}</option>)}
        </select>
        <div class="seg">{WINDOWS.map(([l, s]) => <button class={`btn seg-btn ${win === s ? "active" : ""}`} onClick={() => { setWin(s); setPage(0); }}>{l}</button>)}</div>
        <div class="spacer" />
        <Allowed role="operator"><button class="btn" onClick={() => setAdding(true)}>Record a stop</button></Allowed>
      </div>
      <ErrorBanner p={list.err} />
      {adding && <Card title={`New stop on ${wcName(names, wc)}`}><NewDowntime wc={wc} onDone={() => { setAdding(false); list.reload(); }} /></Card>}
      <div class="grid-3">
        <OeeTiles oee={wcOee.data?.oee} title={`${wcName(names, wc)}, last ${WINDOWS.find(([, s]) => s === win)?.[0]}`} testid="oee-wc" />
        <OeeTiles oee={orderOee.data?.oee} title={running ? `Order ${running.number}` : "No order running"} testid="oee-order" />
        <Card title="Pareto by reason" testid="pareto-card"><Pareto rows={rows} names={names} /></Card>
      </div>
      <Card title={`Open stops (${openRows.length})`}>{openRows.length ? table(openRows, "open-downtimes") : <Empty>{wcName(names, wc)} is not down.</Empty>}</Card>
      <Card title={`Past stops (${past.length})`}>
        {past.length ? (
          <>
            {table(past.slice(page * PAGE, page * PAGE + PAGE), "past-downtimes")}
            <div class="pager">
              <button class="btn ghost" disabled={page === 0} onClick={() => setPage(page - 1)}>‹ Previous</button>
              <span>Page {page + 1} of {Math.ceil(past.length / PAGE)}</span>
              <button class="btn ghost" disabled={(page + 1) * PAGE >= past.length} onClick={() => setPage(page + 1)}>Next ›</button>
            </div>
          </>
        ) : <Empty>None in this window.</Empty>}
      </Card>
    </div>
  );
}
