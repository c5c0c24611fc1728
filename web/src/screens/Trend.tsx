import uPlot from "uplot";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { ingest, problem, type Problem } from "../api";
import { Quality } from "../gen/fabrica/common/v1/reading_pb";
import type { ReadingSummary } from "../gen/fabrica/ingest/v1/query_pb";
import { downloadCsv, fmtNum, tsDate, valueNumber } from "../format";
import { Card, Empty, ErrorBanner, tagInfo, useNames } from "../ui";

/** At most this many buckets per tag: the server aggregates, the chart draws a bounded number of points. */
const MAX_POINTS = 600;
/** Below this span the chart shows raw readings instead of buckets. */
const RAW_BELOW_S = 15 * 60;
const RANGES: [string, number][] = [["15 min", 900], ["1 h", 3600], ["6 h", 21600], ["24 h", 86400], ["7 days", 604800]];
const COLORS = ["#2563eb", "#16a34a", "#db2777", "#ea580c", "#7c3aed", "#0891b2"];

type Series = { tagId: bigint; x: number[]; y: (number | null)[]; lo?: (number | null)[]; hi?: (number | null)[] };
type Shown = { mode: "raw" | "buckets"; bucketSeconds: number; series: Series[]; start: number; end: number };

function setHash(tags: bigint[], start?: number, end?: number, span?: number) {
  const q = new URLSearchParams();
  if (tags.length) q.set("tags", tags.join(","));
  if (start !== undefined && end !== undefined) { q.set("start", String(Math.round(start))); q.set("end", String(Math.round(end))); }
  else if (span) q.set("span", String(span));
  location.hash = `#/trend?${q}`;
}

async function fetchShown(tags: bigint[], start: number, end: number): Promise<Shown> {
  const span = end - start;
  const filter = {
    tagIds: tags, startTime: timestampFromMs(start * 1000), endTime: timestampFromMs(end * 1000), qualities: [Quality.GOOD],
  };
  if (span <= RAW_BELOW_S) {
    const byTag = new Map<bigint, Series>(tags.map((t) => [t, { tagId: t, x: [], y: [] }]));
    let token = "";
    let n = 0;
    do {
      const r = await ingest.queryReadings({ filter, pageSize: 5000, pageToken: token });
      for (const rd of r.readings) {
        const s = byTag.get(rd.tagId);
        const v = valueNumber(rd.value);
        if (!s || v === null) continue;
        s.x.push((tsDate(rd.readTime)?.getTime() ?? 0) / 1000);
        s.y.push(v);
      }
      n += r.readings.length;
      token = r.nextPageToken;
    } while (token && n < 20000);
    return { mode: "raw", bucketSeconds: 0, series: [...byTag.values()], start, end };
  }
  const bucketSeconds = Math.max(1, Math.ceil(span / MAX_POINTS));
  const r = await ingest.aggregateReadings({ filter, bucketSeconds: BigInt(bucketSeconds) });
  const byTag = new Map<bigint, Series>(tags.map((t) => [t, { tagId: t, x: [], y: [], lo: [], hi: [] }]));
  for (const b of r.buckets) {
    const s = byTag.get(b.tagId);
    if (!s) continue;
    s.x.push((tsDate(b.startTime)?.getTime() ?? 0) / 1000 + bucketSeconds / 2);
    s.y.push(b.avg);
    s.lo!.push(b.min);
    s.hi!.push(b.max);
  }
  return { mode: "buckets", bucketSeconds, series: [...byTag.values()], start, end };
}

export function Trend({ params }: { params: URLSearchParams }) {
  const names = useNames();
  const tags = useMemo(() => (params.get("tags") ?? "").split(",").filter((s) => /^\d+$/.test(s)).map((s) => BigInt(s)), [params]);
  const span = Number(params.get("span") ?? 3600) || 3600;
  const fixedStart = params.get("start"), fixedEnd = params.get("end");
  const [shown, setShown] = useState<Shown | null>(null);
  const [err, setErr] = useState<Problem | null>(null);
  const [busy, setBusy] = useState(false);
  const [limits, setLimits] = useState<{ lsl: string; usl: string }>({ lsl: "", usl: "" });
  const [stats, setStats] = useState<Map<bigint, ReadingSummary>>(new Map());
  const [tick, setTick] = useState(0);
  const plotEl = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);

  const range = useMemo(() => {
    if (fixedStart && fixedEnd) return { start: Number(fixedStart), end: Number(fixedEnd), live: false };
    const end = Date.now() / 1000;
    return { start: end - span, end, live: true };
  }, [fixedStart, fixedEnd, span, tick]);

  // A live range (the last hour, ...) moves with the clock.
  useEffect(() => {
    if (!range.live) return;
    const t = setTimeout(() => setTick((n) => n + 1), Math.max(2000, Math.min(30000, span * 1000 / MAX_POINTS)));
    return () => clearTimeout(t);
  }, [range]);

  useEffect(() => {
    if (!tags.length) { setShown(null); return; }
    let gone = false;
    setBusy(true);
    fetchShown(tags, range.start, range.end)
      .then((s) => { if (!gone) { setShown(s); setErr(null); } })
      .catch((e) => { if (!gone) setErr(problem(e)); })
      .finally(() => { if (!gone) setBusy(false); });
    return () => { gone = true; };
  }, [tags, range]);

  const lsl = limits.lsl.trim() === "" ? undefined : Number(limits.lsl);
  const usl = limits.usl.trim() === "" ? undefined : Number(limits.usl);
  const limitProblem: Problem | null = (lsl !== undefined && !Number.isFinite(lsl)) || (usl !== undefined && !Number.isFinite(usl))
    ? { code: 3, message: "", fields: { limits: "A limit must be a number." } }
    : lsl !== undefined && usl !== undefined && lsl >= usl ? { code: 3, message: "", fields: { limits: "The lower limit must be below the upper limit." } } : null;

  useEffect(() => {
    if (!tags.length || limitProblem) return;
    let gone = false;
    Promise.all(tags.map((t) => ingest.summarizeReadings({
      tagId: t, startTime: timestampFromMs(range.start * 1000), endTime: timestampFromMs(range.end * 1000),
      lowerSpecLimit: lsl, upperSpecLimit: usl,
    }).then((r) => [t, r.summary] as const)))
      .then((all) => { if (!gone) setStats(new Map(all.filter(([, s]) => s).map(([t, s]) => [t, s!]))); })
      .catch((e) => { if (!gone) setErr(problem(e)); });
    return () => { gone = true; };
  }, [tags, range, limits.lsl, limits.usl]);

  const label = (t: bigint) => {
    const info = tagInfo(names, t);
    return info ? `${info.plc.displayName || info.plc.id} · ${info.name}${info.unit ? ` (${info.unit})` : ""}` : `tag ${t}`;
  };

  // Draw.
  useEffect(() => {
    const el = plotEl.current;
    if (!el) return;
    plot.current?.destroy();
    plot.current = null;
    if (!shown || shown.series.every((s) => s.x.length === 0)) return;
    const tables: uPlot.AlignedData[] = shown.series.map((s) => [s.x, s.y] as uPlot.AlignedData);
    const data = uPlot.join(tables as any) as uPlot.AlignedData;
    const series: uPlot.Series[] = [{}];
    shown.series.forEach((s, i) => series.push({
      label: label(s.tagId), stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
      points: { show: shown.mode === "raw" && s.x.length < 400, size: 4 },
    }));
    // The least-squares line of the first tag (from SummarizeReadings).
    const first = shown.series[0];
    const st = first && stats.get(first.tagId);
    if (st && st.slopePerHour !== undefined && st.intercept !== undefined) {
      const xs = data[0] as number[];
      const y = xs.map((x) => st.intercept! + st.slopePerHour! * ((x - shown.start) / 3600));
      (data as any).push(y);
      series.push({ label: "trend line", stroke: "#64748b", dash: [6, 4], width: 1.5, points: { show: false } });
    }
    const width = el.clientWidth || 800;
    plot.current = new uPlot({
      width, height: Math.max(260, Math.min(440, width * 0.45)),
      series,
      scales: { x: { time: true, min: shown.start, max: shown.end } },
      axes: [{ stroke: "#475569", grid: { stroke: "#e2e8f0" } }, { stroke: "#475569", grid: { stroke: "#e2e8f0" }, size: 60 }],
      cursor: { drag: { x: true, y: false } },
      legend: { live: true },
      hooks: {
        setSelect: [(u) => {
          if (u.select.width < 5) return;
          const a = u.posToVal(u.select.left, "x"), b = u.posToVal(u.select.left + u.select.width, "x");
          setHash(tags, a, b);
        }],
      },
    }, data, el);
    const ro = new ResizeObserver(() => plot.current?.setSize({ width: el.clientWidth, height: Math.max(260, Math.min(440, el.clientWidth * 0.45)) }));
    ro.observe(el);
    return () => ro.disconnect();
  }, [shown, stats, names]);
  useEffect(() => () => plot.current?.destroy(), []);

  const points = shown?.series.reduce((n, s) => n + s.x.length, 0) ?? 0;
  const exportCsv = () => {
    if (!shown) return;
    const rows: unknown[][] = [];
    for (const s of shown.series) s.x.forEach((x, i) => rows.push([
      new Date(x * 1000).toISOString(), label(s.tagId), s.y[i], s.lo?.[i] ?? "", s.hi?.[i] ?? "",
    ]));
    downloadCsv(`trend-${new Date().toISOString().slice(0, 19)}.csv`,
      ["time", "tag", shown.mode === "raw" ? "value" : "avg", "min", "max"], rows);
  };
  const allTags = useMemo(() => [...(names?.tags.entries() ?? [])].sort((a, b) => label(a[0]).localeCompare(label(b[0]))), [names]);

  return (
    <div class="page">
      <div class="page-head"><h1>Trend</h1>
        <span class="muted" data-testid="trend-mode">{shown ? (shown.mode === "raw" ? `raw readings · ${points} points` : `${shown.bucketSeconds} s buckets · ${points} points`) : ""}</span>
      </div>
      <div class="toolbar">
        <div class="seg">
          {RANGES.map(([l, s]) => (
            <button class={`btn seg-btn ${!fixedStart && span === s ? "active" : ""}`} onClick={() => setHash(tags, undefined, undefined, s)}>{l}</button>
          ))}
        </div>
        {fixedStart && <button class="btn ghost" onClick={() => setHash(tags, undefined, undefined, span)}>Reset zoom</button>}
        <select class="input" value="" onChange={(e) => { const v = e.currentTarget.value; if (v) setHash([...tags, BigInt(v)], fixedStart ? Number(fixedStart) : undefined, fixedEnd ? Number(fixedEnd) : undefined, span); }} aria-label="Add a tag">
          <option value="">Add a tag…</option>
          {allTags.filter(([id]) => !tags.includes(id)).map(([id]) => <option value={id.toString()}>{label(id)}</option>)}
        </select>
        <button class="btn" disabled={!shown || points === 0} onClick={exportCsv}>Export CSV</button>
      </div>
      <ErrorBanner p={err} />
      {tags.length === 0 ? <Card><Empty>Pick a tag above, or click a value on the Plant screen.</Empty></Card> : (
        <>
          <Card testid="trend-chart" title={<span class="chips">{tags.map((t, i) => (
            <span class="chip" style={{ borderColor: COLORS[i % COLORS.length] }}>{label(t)}
              <button class="chip-x" aria-label="Remove" onClick={() => setHash(tags.filter((x) => x !== t), fixedStart ? Number(fixedStart) : undefined, fixedEnd ? Number(fixedEnd) : undefined, span)}>×</button></span>
          ))}</span>}>
            {busy && !shown && <Empty>Loading…</Empty>}
            {shown && points === 0 && <Empty>No good readings in this range.</Empty>}
            <div ref={plotEl} class="plot" data-points={points} />
            <div class="muted small">Drag across the chart to zoom in; below 15 minutes it shows every reading.</div>
          </Card>
          <Card title="Statistics" testid="trend-stats">
            <div class="form-row">
              <label class={`field ${limitProblem ? "invalid" : ""}`} data-field="lower_spec_limit"><span class="field-label">Lower spec limit</span>
                <input class="input" inputMode="decimal" value={limits.lsl} onInput={(e) => setLimits({ ...limits, lsl: e.currentTarget.value })} /></label>
              <label class={`field ${limitProblem ? "invalid" : ""}`} data-field="upper_spec_limit"><span class="field-label">Upper spec limit</span>
                <input class="input" inputMode="decimal" value={limits.usl} onInput={(e) => setLimits({ ...limits, usl: e.currentTarget.value })} />
                {limitProblem && <span class="field-error">{limitProblem.fields.limits}</span>}</label>
            </div>
            <table class="table">
              <thead><tr><th>Tag</th><th class="num">Count</th><th class="num">Mean</th><th class="num">Std dev</th><th class="num">Min</th><th class="num">Max</th><th class="num">Cp</th><th class="num">Cpk</th><th class="num">Trend / h</th></tr></thead>
              <tbody>
                {tags.map((t) => {
                  const s = stats.get(t);
                  const cpk = s?.cpk;
                  return (
                    <tr>
                      <td>{label(t)}</td>
                      <td class="num">{s ? s.count.toString() : "—"}</td>
                      <td class="num">{s ? fmtNum(s.mean) : "—"}</td>
                      <td class="num">{s ? fmtNum(s.stddev) : "—"}</td>
                      <td class="num">{s ? fmtNum(s.min) : "—"}</td>
                      <td class="num">{s ? fmtNum(s.max) : "—"}</td>
                      <td class="num">{s?.cp !== undefined ? s.cp.toFixed(2) : "—"}</td>
                      <td class={`num ${cpk !== undefined ? (cpk < 1 ? "text-bad" : cpk < 1.33 ? "text-warn" : "text-ok") : ""}`}>{cpk !== undefined ? cpk.toFixed(2) : "—"}</td>
                      <td class="num">{s?.slopePerHour !== undefined ? fmtNum(s.slopePerHour) : "—"}</td>
                    </tr>
                  );
                })}
              </tbody>
            </table>
            <div class="muted small">Cp and Cpk need a limit and some spread; Cpk below 1.33 is shown amber, below 1 red.</div>
          </Card>
        </>
      )}
    </div>
  );
}
