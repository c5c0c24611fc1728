import { useEffect, useMemo, useState } from "preact/hooks";
import { ingest, keepStreaming, type StreamState } from "../api";
import { Quality, type Reading } from "../gen/fabrica/common/v1/reading_pb";
import { agoText, latencyText, QUALITY_WORDS, tsDate, valueText } from "../format";
import { useCollectorStatus } from "../live";
import { Card, Dot, Empty, ErrorBanner, plcName, StreamBadge, useNames, useNow, VirtualRows } from "../ui";

/** The live values of one PLC's tags: WatchLatestValues (a snapshot, then what changed), again after a break. */
function useLiveValues(plcId: string) {
  const [live, setLive] = useState<{ byTag: Map<bigint, Reading>; state: StreamState; why?: string }>(
    { byTag: new Map(), state: "connecting" });
  useEffect(() => {
    if (!plcId) return;
    let byTag = new Map<bigint, Reading>();
    setLive({ byTag, state: "connecting" });
    return keepStreaming(
      (signal) => ingest.watchLatestValues({ plcId }, { signal }),
      (m) => {
        byTag = m.snapshot ? new Map() : new Map(byTag);
        for (const r of m.readings) byTag.set(r.tagId, r);
        setLive({ byTag, state: "live" });
      },
      (state, why) => setLive((l) => ({ ...l, state, why })),
    );
  }, [plcId]);
  return live;
}

export function Plant({ params }: { params: URLSearchParams }) {
  const names = useNames();
  const status = useCollectorStatus();
  const now = useNow();
  const plcIds = useMemo(() => {
    const ids = new Set<string>([...(names?.plcs.keys() ?? [])]);
    for (const p of status.data?.plcs ?? []) ids.add(p.plcId);
    return [...ids].sort();
  }, [names, status.data]);
  const selected = params.get("plc") || plcIds[0] || "";
  const runtime = status.data?.plcs.find((p) => p.plcId === selected);
  const plc = names?.plcs.get(selected);
  const [filter, setFilter] = useState("");
  const live = useLiveValues(selected);
  const rows = useMemo(() => {
    const byTag = live.byTag;
    const defs = plc?.tags ?? [];
    const out = defs.map((t) => ({ id: t.id, name: t.name, unit: t.unit, description: t.description, reading: byTag.get(t.id) }));
    for (const r of byTag.values()) if (!defs.some((t) => t.id === r.tagId)) out.push({ id: r.tagId, name: r.tagName || `tag ${r.tagId}`, unit: r.unit, description: "", reading: r });
    const f = filter.trim().toLowerCase();
    return f ? out.filter((r) => r.name.toLowerCase().includes(f) || r.description.toLowerCase().includes(f)) : out;
  }, [live.byTag, plc, filter]);

  return (
    <div class="page">
      <div class="page-head"><h1>Plant</h1><span class="muted">{status.data ? `collector ${status.data.collectorId}, configuration revision ${status.data.appliedRevision}` : ""}</span></div>
      <ErrorBanner p={status.err} />
      <div class="plc-strip" data-testid="plc-list">
        {plcIds.map((id) => {
          const rt = status.data?.plcs.find((p) => p.plcId === id);
          return (
            <a key={id} href={`#/plant?plc=${encodeURIComponent(id)}`} class={`plc-card ${id === selected ? "active" : ""}`} data-plc={id}>
              <div class="plc-card-head"><Dot ok={!!rt?.connected} warn={!!rt?.lastError} /><strong>{plcName(names, id)}</strong></div>
              <div class="muted small">{rt ? (rt.connected ? "connected" : "disconnected") : "not reported by this collector"}</div>
              <div class="muted small">{rt ? `${rt.tagCount} tags · ${latencyText(rt.readLatency)} · ${agoText(rt.lastGoodReadTime, now)}` : ""}</div>
            </a>
          );
        })}
        {plcIds.length === 0 && <Empty>No PLC is configured. Add one under Configuration.</Empty>}
      </div>
      {selected && (
        <div class="grid-plant">
          <Card title={plc?.displayName || selected} testid="plc-detail">
            <dl class="facts">
              <dt>Connection</dt><dd><Dot ok={!!runtime?.connected} warn={!!runtime?.lastError} /> {runtime ? (runtime.connected ? "connected" : "disconnected") : "unknown"}</dd>
              <dt>Last good read</dt><dd>{agoText(runtime?.lastGoodReadTime, now)}</dd>
              <dt>Read latency</dt><dd>{latencyText(runtime?.readLatency)}</dd>
              <dt>Failed reads</dt><dd>{runtime ? runtime.errorCount.toString() : "—"}</dd>
              <dt>Block reads</dt><dd>{runtime ? runtime.reads.length : "—"}</dd>
              {runtime?.lastError && (<><dt>Last error</dt><dd class="text-bad clamp" title={runtime.lastError}>{runtime.lastError}</dd></>)}
              {runtime && runtime.absentTags.length > 0 && (<><dt>Absent tags</dt><dd title={runtime.absentTags.map((a) => a.tagName).join(", ")}>
                {runtime.absentTags.length} the device lacks: {runtime.absentTags.slice(0, 8).map((a) => a.tagName).join(", ")}{runtime.absentTags.length > 8 ? ", …" : ""}</dd></>)}
            </dl>
          </Card>
          <Card title={<>Tags ({rows.length}) <StreamBadge state={live.state} why={live.why} /></>} actions={<input class="input small" type="search" placeholder="Filter by name" value={filter} onInput={(e) => setFilter(e.currentTarget.value)} />} testid="tag-table">
            {live.state === "reconnecting" && <div class="banner warn small">Live values are reconnecting: {live.why}</div>}
            {rows.length === 0 ? <Empty>No values yet.</Empty> : (
              <VirtualRows rows={rows} rowHeight={41} height={560}
                header={<tr><th>Tag</th><th class="num">Value</th><th>Quality</th><th>Age</th></tr>}
                render={(r) => {
                  const q = r.reading?.quality ?? Quality.UNSPECIFIED;
                  const age = r.reading ? (now - (tsDate(r.reading.readTime)?.getTime() ?? now)) / 1000 : Infinity;
                  return (
                    <tr key={r.id.toString()} data-tag={r.name} class="row-h">
                      <td><strong>{r.name}</strong>{r.description && <div class="muted small ellipsis">{r.description}</div>}</td>
                      <td class="num">
                        <a class="value-link" href={`#/trend?tags=${r.id}`} title="Open its trend" data-testid="tag-value">
                          {r.reading ? valueText(r.reading.value, r.unit || r.reading.unit) : "—"}
                        </a>
                      </td>
                      <td><span class={`pill q-${q}`} title={r.reading?.error}>{QUALITY_WORDS[q]}</span></td>
                      <td class={age > 120 ? "text-warn" : "muted"}>{r.reading ? agoText(r.reading.readTime, now) : "—"}</td>
                    </tr>
                  );
                }} />
            )}
          </Card>
        </div>
      )}
    </div>
  );
}
