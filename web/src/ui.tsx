// Small shared pieces: hooks for calls and polling, the names cache, form fields, progress bars, pager.
import type { ComponentChildren, JSX } from "preact";
import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import { auth, config, fieldError, problem, production, type Problem, type Role, type StreamState } from "./api";
import type { Plc } from "./gen/fabrica/config/v1/plc_pb";
import type { DefectCode, DowntimeReason, Item, WorkCenter } from "./gen/fabrica/production/v1/master_data_pb";

// ---- hooks ------------------------------------------------------------------------------------------------

export function useAuth() {
  const [, force] = useState(0);
  useEffect(() => auth.subscribe(() => force((n) => n + 1)), []);
  return auth;
}

/** Runs `fn` now and every `ms` (when given) while mounted; returns data, problem and a reload. */
export function useLoad<T>(fn: () => Promise<T>, deps: unknown[], ms?: number) {
  const [data, setData] = useState<T | undefined>(undefined);
  const [err, setErr] = useState<Problem | null>(null);
  const [busy, setBusy] = useState(true);
  const seq = useRef(0);
  const reload = useCallback(async () => {
    const mine = ++seq.current;
    try {
      const d = await fn();
      if (mine === seq.current) { setData(d); setErr(null); }
    } catch (e) {
      if (mine === seq.current) setErr(problem(e));
    } finally {
      if (mine === seq.current) setBusy(false);
    }
  }, deps);
  useEffect(() => {
    setBusy(true);
    reload();
    if (!ms) return () => { seq.current++; };
    let timer = 0;
    let stopped = false;
    const tick = async () => {
      if (stopped) return;
      if (!document.hidden) await reload();
      if (!stopped) timer = window.setTimeout(tick, ms);
    };
    timer = window.setTimeout(tick, ms);
    return () => { stopped = true; clearTimeout(timer); seq.current++; };
  }, [reload, ms]);
  return { data, err, busy, reload, setData };
}

/** Re-renders every `ms` (for ages such as "3 s ago"). */
export function useNow(ms = 1000): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => { const t = setInterval(() => setNow(Date.now()), ms); return () => clearInterval(t); }, [ms]);
  return now;
}

// ---- names: every id on screen is shown by its name --------------------------------------------------------

export type Names = {
  plcs: Map<string, Plc>;
  workCenters: Map<string, WorkCenter>;
  items: Map<string, Item>;
  reasons: Map<string, DowntimeReason>;
  defectCodes: Map<string, DefectCode>;
  tags: Map<bigint, { plc: Plc; name: string; unit: string }>;
};

let namesCache: Names | null = null;
let namesPromise: Promise<Names> | null = null;
/** The latest read of the names: an older one that answers late never overwrites a newer one. */
let namesSeq = 0;
const namesListeners = new Set<(n: Names) => void>();

async function pages<T>(call: (token: string) => Promise<[T[], string]>): Promise<T[]> {
  const out: T[] = [];
  let token = "";
  do { const [items, next] = await call(token); out.push(...items); token = next; } while (token && out.length < 20000);
  return out;
}

/** How soon names are read again after one of their lists failed (doubling up to NAMES_RETRY_MAX_MS). */
const NAMES_RETRY_MS = 1000;
const NAMES_RETRY_MAX_MS = 8000;
let namesRetryMs = NAMES_RETRY_MS;
let namesRetryTimer = 0;

export async function loadNames(): Promise<Names> {
  // A list that fails (a call before sign-in, a service restarting) leaves its names out for now, and the
  // names are read again shortly (below): a failure must not be cached as "no names" for the page's life.
  const mine = ++namesSeq;
  let failed = false;
  const settle = async <T,>(p: Promise<T[]>): Promise<T[]> => { try { return await p; } catch { failed = true; return []; } };
  const [plcs, wcs, items, reasons, codes] = await Promise.all([
    settle(pages((t) => config.listPlcs({ pageSize: 500, pageToken: t }).then((r) => [r.plcs, r.nextPageToken]))),
    settle(pages((t) => production.listWorkCenters({ pageSize: 500, pageToken: t }).then((r) => [r.workCenters, r.nextPageToken]))),
    settle(pages((t) => production.listItems({ pageSize: 500, pageToken: t }).then((r) => [r.items, r.nextPageToken]))),
    settle(pages((t) => production.listDowntimeReasons({ pageSize: 500, pageToken: t }).then((r) => [r.downtimeReasons, r.nextPageToken]))),
    settle(pages((t) => production.listDefectCodes({ pageSize: 500, pageToken: t }).then((r) => [r.defectCodes, r.nextPageToken]))),
  ]);
  const tags = new Map<bigint, { plc: Plc; name: string; unit: string }>();
  for (const p of plcs) for (const t of p.tags) tags.set(t.id, { plc: p, name: t.name, unit: t.unit });
  const n: Names = {
    plcs: new Map(plcs.map((p) => [p.id, p])),
    workCenters: new Map(wcs.map((w) => [w.id, w])),
    items: new Map(items.map((i) => [i.id, i])),
    reasons: new Map(reasons.map((r) => [r.id, r])),
    defectCodes: new Map(codes.map((c) => [c.id, c])),
    tags,
  };
  if (mine !== namesSeq) return namesCache ?? n;
  namesCache = n;
  namesListeners.forEach((l) => l(n));
  clearTimeout(namesRetryTimer);
  if (failed) { namesRetryTimer = window.setTimeout(refreshNames, namesRetryMs); namesRetryMs = Math.min(namesRetryMs * 2, NAMES_RETRY_MAX_MS); }
  else namesRetryMs = NAMES_RETRY_MS;
  return n;
}

export function refreshNames(): void {
  namesPromise = loadNames();
}

/** The names, re-rendering the component whenever they are read again. */
export function useNames(): Names | null {
  const [n, setN] = useState<Names | null>(namesCache);
  useEffect(() => {
    namesListeners.add(setN);
    // The names may have arrived between this component's first render and now (effects run after the
    // paint): a component that only waited for the next read would show ids until then.
    if (namesCache) setN(namesCache);
    else { namesPromise ??= loadNames(); namesPromise.then(() => { if (namesCache) setN(namesCache); }, () => undefined); }
    return () => { namesListeners.delete(setN); };
  }, []);
  return n;
}

// An id the names do not know (master data created since they were read, by someone else or in another
// tab) reads the names again, at most once per id and MISS_MS, so it shows by its name a moment later;
// an id that stays unknown (deleted since) shows as itself and costs one read.
const MISS_MS = 500;
const missed = new Set<string>();
let missTimer = 0;
function miss(kind: string, id: string): void {
  const key = `${kind}\u0000${id}`;
  if (!id || !namesCache || missed.has(key)) return;
  missed.add(key);
  if (!missTimer) missTimer = window.setTimeout(() => { missTimer = 0; refreshNames(); }, MISS_MS);
}

function named(kind: "plcs" | "workCenters" | "items" | "reasons" | "defectCodes", n: Names | null, id: string): string {
  const v = n?.[kind].get(id);
  if (!v && n) miss(kind, id);
  return v?.displayName || id;
}

export const plcName = (n: Names | null, id: string) => named("plcs", n, id);
export const wcName = (n: Names | null, id: string) => named("workCenters", n, id);
export const itemName = (n: Names | null, id: string) => named("items", n, id);
export const reasonName = (n: Names | null, id: string) => (id ? named("reasons", n, id) : "Unclassified");
export const codeName = (n: Names | null, id: string) => named("defectCodes", n, id);
/** A tag's PLC, name and unit, or undefined (and the names are read again) while they do not know it. */
export function tagInfo(n: Names | null, id: bigint): { plc: Plc; name: string; unit: string } | undefined {
  const t = n?.tags.get(id);
  if (!t && n) miss("tags", String(id));
  return t;
}

// ---- components -------------------------------------------------------------------------------------------

export function Card(props: { title?: ComponentChildren; actions?: ComponentChildren; children: ComponentChildren; class?: string; testid?: string }) {
  return (
    <section class={`card ${props.class ?? ""}`} data-testid={props.testid}>
      {(props.title || props.actions) && (
        <header class="card-head">
          <h2>{props.title}</h2>
          <div class="card-actions">{props.actions}</div>
        </header>
      )}
      <div class="card-body">{props.children}</div>
    </section>
  );
}

export function ErrorBanner({ p }: { p: Problem | null | undefined }) {
  if (!p) return null;
  const fieldOnly = Object.keys(p.fields).length > 0;
  return <div class={`banner ${fieldOnly ? "warn" : "error"}`} role="alert">{p.message}</div>;
}

export function StreamBadge({ state, why }: { state: StreamState; why?: string }) {
  const words = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…" }[state];
  return <span class={`badge stream-${state}`} title={why} data-testid="stream-state">{words}</span>;
}

type FieldProps = {
  label: string;
  path: string;
  p?: Problem | null;
  hint?: string;
  children: ComponentChildren;
  wide?: boolean;
};

/** A labelled input with the violation of its field (client-side or the server's) right under it. */
export function Field({ label, path, p, hint, children, wide }: FieldProps) {
  const msg = fieldError(p, path);
  return (
    <label class={`field ${msg ? "invalid" : ""} ${wide ? "wide" : ""}`} data-field={path}>
      <span class="field-label">{label}</span>
      {children}
      {msg ? <span class="field-error" role="alert">{msg}</span> : hint ? <span class="field-hint">{hint}</span> : null}
    </label>
  );
}

export function Progress({ good, scrap, planned }: { good: bigint; scrap: bigint; planned: bigint }) {
  const p = Number(planned) || 1;
  const g = Math.min(100, (Number(good) / p) * 100);
  const s = Math.min(100 - g, (Number(scrap) / p) * 100);
  return (
    <div class="progress" role="progressbar" aria-valuemin={0} aria-valuemax={Number(planned)} aria-valuenow={Number(good)}
      title={`${good} good, ${scrap} scrap of ${planned} planned`}>
      <div class="progress-good" style={{ width: `${g}%` }} />
      <div class="progress-scrap" style={{ width: `${s}%` }} />
    </div>
  );
}

export function Dot({ ok, warn }: { ok: boolean; warn?: boolean }) {
  return <span class={`dot ${ok ? (warn ? "dot-warn" : "dot-ok") : "dot-bad"}`} aria-hidden="true" />;
}

export function Pager({ page, hasNext, onPrev, onNext }: { page: number; hasNext: boolean; onPrev: () => void; onNext: () => void }) {
  return (
    <div class="pager">
      <button class="btn ghost" disabled={page === 0} onClick={onPrev}>‹ Previous</button>
      <span>Page {page + 1}</span>
      <button class="btn ghost" disabled={!hasNext} onClick={onNext}>Next ›</button>
    </div>
  );
}

/** Shows its children only to users whose role is at least `role`. */
export function Allowed({ role, children }: { role: Role; children: ComponentChildren }) {
  useAuth();
  return auth.can(role) ? <>{children}</> : null;
}

/** A list paged through a List call's page tokens. */
export function usePaged<T>(call: (token: string) => Promise<[T[], string]>, deps: unknown[]) {
  const [tokens, setTokens] = useState<string[]>([""]);
  const [page, setPage] = useState(0);
  useEffect(() => { setTokens([""]); setPage(0); }, deps);
  const res = useLoad(() => call(tokens[page] ?? ""), [page, tokens, ...deps]);
  const next = res.data?.[1] ?? "";
  return {
    items: res.data?.[0] ?? [],
    err: res.err,
    reload: res.reload,
    pager: (
      <Pager page={page} hasNext={!!next}
        onPrev={() => setPage((p) => Math.max(0, p - 1))}
        onNext={() => { setTokens((t) => { const c = t.slice(0, page + 1); c.push(next); return c; }); setPage((p) => p + 1); }} />
    ),
  };
}

/** Rows of a long table rendered only where they are visible (1,000 live tags stay smooth). */
export function VirtualRows<T>(props: {
  rows: T[];
  rowHeight: number;
  height: number;
  header: JSX.Element;
  render: (row: T, i: number) => JSX.Element;
  testid?: string;
}) {
  const [top, setTop] = useState(0);
  const { rows, rowHeight, height } = props;
  const first = Math.max(0, Math.floor(top / rowHeight) - 10);
  const count = Math.ceil(height / rowHeight) + 20;
  const slice = rows.slice(first, first + count);
  return (
    <div class="vscroll" style={{ maxHeight: `${height}px` }} onScroll={(e) => setTop((e.currentTarget as HTMLElement).scrollTop)} data-testid={props.testid}>
      <table class="table">
        <thead>{props.header}</thead>
        <tbody>
          {first > 0 && <tr style={{ height: `${first * rowHeight}px` }} aria-hidden="true" />}
          {slice.map((r, i) => props.render(r, first + i))}
          {first + slice.length < rows.length && (
            <tr style={{ height: `${(rows.length - first - slice.length) * rowHeight}px` }} aria-hidden="true" />
          )}
        </tbody>
      </table>
    </div>
  );
}

export function navigate(hash: string): void {
  location.hash = hash;
}

export function Empty({ children }: { children: ComponentChildren }) {
  return <div class="empty">{children}</div>;
}
