import { useEffect, useMemo, useState } from "preact/hooks";
import { clone, create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { FieldMaskSchema } from "@bufbuild/protobuf/wkt";
import { collector, config, problem, validate, type Problem } from "../api";
import {
  DataType, ModbusTable, PlcSchema, PollGroupSchema, S7Area, TagSchema, type Plc, type Tag,
} from "../gen/fabrica/config/v1/plc_pb";
import { CreatePlcRequestSchema } from "../gen/fabrica/config/v1/config_service_pb";
import { Protocol, type DeviceProfile } from "../gen/fabrica/config/v1/device_profile_pb";
import { TagRole, Quality } from "../gen/fabrica/common/v1/reading_pb";
import type { PreviewDecodeResponse, ProbePlcResponse } from "../gen/fabrica/collector/v1/collector_service_pb";
import { agoText, latencyText, QUALITY_WORDS, timeText, valueText } from "../format";
import { Allowed, Card, Dot, Empty, ErrorBanner, Field, plcName, refreshNames, useLoad, useNames, usePaged } from "../ui";
import { MasterData } from "./MasterData";

type ConnKind = "modbusTcp" | "modbusRtuOverTcp" | "s7";
const CONN_WORDS: Record<ConnKind, string> = { modbusTcp: "Modbus TCP", modbusRtuOverTcp: "Modbus RTU over TCP (serial gateway)", s7: "Siemens S7" };
const CONN_PATH: Record<ConnKind, string> = { modbusTcp: "modbus_tcp", modbusRtuOverTcp: "modbus_rtu_over_tcp", s7: "s7" };
const DATA_TYPES = Object.entries(DataType).filter(([, v]) => typeof v === "number" && v !== 0) as [string, DataType][];
const ROLES: [TagRole, string][] = [[TagRole.MEASUREMENT, "measurement"], [TagRole.PRODUCTION_COUNTER, "production counter"], [TagRole.SCRAP_COUNTER, "scrap counter"], [TagRole.MACHINE_STATE, "machine state"]];
const TABLES: [ModbusTable, string][] = [[ModbusTable.HOLDING_REGISTER, "holding register"], [ModbusTable.INPUT_REGISTER, "input register"], [ModbusTable.COIL, "coil"], [ModbusTable.DISCRETE_INPUT, "discrete input"]];

function connKind(p: Plc): ConnKind | null {
  const c = p.connection.case;
  return c === "modbusTcp" || c === "modbusRtuOverTcp" || c === "s7" ? c : null;
}

function connText(p: Plc): string {
  const c = p.connection;
  switch (c.case) {
    case "modbusTcp": return `Modbus TCP ${c.value.host}:${c.value.port ?? 502} unit ${c.value.unitId}`;
    case "modbusRtuOverTcp": return `RTU over TCP ${c.value.host}:${c.value.port ?? ""} unit ${c.value.unitId}`;
    case "modbusRtu": return `Modbus RTU ${c.value.serialPort} unit ${c.value.unitId}`;
    case "s7": return `S7 ${c.value.host}:${c.value.port ?? 102} rack ${c.value.rack} slot ${c.value.slot}`;
    default: return "no connection";
  }
}

function addrText(t: Tag): string {
  const a = t.address;
  if (a.case === "modbus") return `${TABLES.find(([v]) => v === a.value.table)?.[1] ?? "register"} ${a.value.address}`;
  if (a.case === "s7") return `${a.value.area === S7Area.DATA_BLOCK ? `DB${a.value.dbNumber}.` : ""}${a.value.byteOffset}${t.bit !== undefined ? `.${t.bit}` : ""}`;
  return "—";
}

function setConn(p: Plc, kind: ConnKind, host: string, port: number | undefined, unit: number, rack = 0, slot = 1) {
  if (kind === "s7") p.connection = { case: "s7", value: { $typeName: "fabrica.config.v1.S7Connection", host, port, rack, slot } as any };
  else if (kind === "modbusTcp") p.connection = { case: "modbusTcp", value: { $typeName: "fabrica.config.v1.ModbusTcpConnection", host, port, unitId: unit } as any };
  else p.connection = { case: "modbusRtuOverTcp", value: { $typeName: "fabrica.config.v1.ModbusRtuOverTcpConnection", host, port, unitId: unit || 1 } as any };
}

function connFields(p: Plc) {
  const c = p.connection;
  const v = (c.value ?? {}) as any;
  return { host: v.host ?? "", port: v.port as number | undefined, unit: v.unitId ?? 1, rack: v.rack ?? 0, slot: v.slot ?? 1 };
}

// ---- preview of one tag -------------------------------------------------------------------------------------

function PreviewCell({ plc, tag }: { plc: Plc; tag: Tag }) {
  const [res, setRes] = useState<PreviewDecodeResponse | null>(null);
  const [err, setErr] = useState<Problem | null>(null);
  const [busy, setBusy] = useState(false);
  const run = async () => {
    setBusy(true);
    try { setRes(await collector.previewDecode({ plc, tag })); setErr(null); } catch (e) { setErr(problem(e)); setRes(null); } finally { setBusy(false); }
  };
  return (
    <span class="preview" data-testid="preview">
      <button class="btn small" type="button" disabled={busy} onClick={run}>{busy ? "Reading…" : "Preview"}</button>
      {res && (res.quality === Quality.GOOD
        ? <span class="preview-value" data-testid="preview-value">{valueText(res.value, tag.unit)}</span>
        : <span class="text-bad small">{QUALITY_WORDS[res.quality]}{res.error ? `: ${res.error}` : ""}</span>)}
      {res && (res.registers.length > 0 || res.rawBytes.length > 0) && (
        <span class="muted small mono" title="raw">{res.registers.length ? res.registers.map((r) => r.toString(16).padStart(4, "0")).join(" ") : [...res.rawBytes].map((b) => b.toString(16).padStart(2, "0")).join(" ")}</span>
      )}
      {err && <span class="field-error">{err.message}</span>}
    </span>
  );
}

// ---- the PLC editor (create by hand, from a profile, or edit with etag) ----------------------------------

type EditorProps = { initial?: Plc; onDone: (saved?: Plc) => void };

function TagRows({ plc, setPlc, p, editable }: { plc: Plc; setPlc: (p: Plc) => void; p: Problem | null; editable: boolean }) {
  const [page, setPage] = useState(0);
  const PAGE = 25;
  const upd = (i: number, f: (t: Tag) => void) => { const c = clone(PlcSchema, plc); f(c.tags[i]); setPlc(c); };
  const s7 = plc.connection.case === "s7";
  const rows = plc.tags.slice(page * PAGE, page * PAGE + PAGE);
  return (
    <>
      <table class="table compact tag-editor" data-testid="tag-editor">
        <thead><tr><th>Name</th><th>Address</th><th>Type</th><th>Unit</th><th>Role</th><th>Value now</th>{editable && <th />}</tr></thead>
        <tbody>
          {rows.map((t, j) => {
            const i = page * PAGE + j;
            const path = `plc.tags[${i}]`;
            return (
              <tr data-tag={t.name}>
                <td>{editable ? <Field label="" path={`${path}.name`} p={p}><input class="input small" value={t.name} onInput={(e) => upd(i, (x) => { x.name = e.currentTarget.value; })} aria-label="Tag name" /></Field> : <strong>{t.name}</strong>}</td>
                <td>{editable ? (
                  <Field label="" path={`${path}.${s7 ? "s7" : "modbus"}`} p={p}>
                    <span class="inline">
                      {s7 ? (
                        <>
                          <span class="muted small">DB</span><input class="input small w-num" inputMode="numeric" value={t.address.case === "s7" ? t.address.value.dbNumber : 1} onInput={(e) => upd(i, (x) => { x.address = { case: "s7", value: { ...(x.address.value as any), $typeName: "fabrica.config.v1.S7Address", area: S7Area.DATA_BLOCK, dbNumber: Number(e.currentTarget.value) || 0, byteOffset: x.address.case === "s7" ? x.address.value.byteOffset : 0 } }; })} aria-label="DB number" />
                          <span class="muted small">byte</span><input class="input small w-num" inputMode="numeric" value={t.address.case === "s7" ? t.address.value.byteOffset : 0} onInput={(e) => upd(i, (x) => { x.address = { case: "s7", value: { ...(x.address.value as any), $typeName: "fabrica.config.v1.S7Address", area: S7Area.DATA_BLOCK, dbNumber: x.address.case === "s7" ? x.address.value.dbNumber : 1, byteOffset: Number(e.currentTarget.value) || 0 } }; })} aria-label="Byte offset" />
                        </>
                      ) : (
                        <>
                          <select class="input small" value={t.address.case === "modbus" ? t.address.value.table : ModbusTable.HOLDING_REGISTER} onChange={(e) => upd(i, (x) => { x.address = { case: "modbus", value: { $typeName: "fabrica.config.v1.ModbusAddress", table: Number(e.currentTarget.value), address: x.address.case === "modbus" ? x.address.value.address : 0 } as any }; })} aria-label="Table">
                            {TABLES.map(([v, l]) => <option value={v}>{l}</option>)}
                          </select>
                          <input class="input small w-num" inputMode="numeric" value={t.address.case === "modbus" ? t.address.value.address : 0} onInput={(e) => upd(i, (x) => { x.address = { case: "modbus", value: { $typeName: "fabrica.config.v1.ModbusAddress", table: x.address.case === "modbus" ? x.address.value.table : ModbusTable.HOLDING_REGISTER, address: Number(e.currentTarget.value) || 0 } as any }; })} aria-label="Address" />
                        </>
                      )}
                    </span>
                  </Field>
                ) : addrText(t)}</td>
                <td>{editable ? (
                  <Field label="" path={`${path}.data_type`} p={p}>
                    <select class="input small" value={t.dataType} onChange={(e) => upd(i, (x) => { x.dataType = Number(e.currentTarget.value); })} aria-label="Data type">
                      {DATA_TYPES.map(([n, v]) => <option value={v}>{n.toLowerCase()}</option>)}
                    </select>
                  </Field>
                ) : DataType[t.dataType]?.toLowerCase()}</td>
                <td>{editable ? <Field label="" path={`${path}.unit`} p={p}><input class="input small w-unit" value={t.unit} onInput={(e) => upd(i, (x) => { x.unit = e.currentTarget.value; })} aria-label="Unit" /></Field> : t.unit}</td>
                <td>{editable ? (
                  <select class="input small" value={t.role} onChange={(e) => upd(i, (x) => { x.role = Number(e.currentTarget.value); })} aria-label="Role">
                    {ROLES.map(([v, l]) => <option value={v}>{l}</option>)}
                  </select>
                ) : ROLES.find(([v]) => v === t.role)?.[1] ?? "measurement"}</td>
                <td><PreviewCell plc={plc} tag={t} /></td>
                {editable && <td><button class="btn small danger-ghost" type="button" onClick={() => { const c = clone(PlcSchema, plc); c.tags.splice(i, 1); setPlc(c); }} aria-label="Remove tag">×</button></td>}
              </tr>
            );
          })}
        </tbody>
      </table>
      <div class="pager">
        {editable && <button class="btn small" type="button" onClick={() => {
          const c = clone(PlcSchema, plc);
          c.tags.push(create(TagSchema, {
            name: `tag_${c.tags.length + 1}`, pollGroup: c.pollGroups[0]?.name ?? "default", dataType: DataType.UINT16, role: TagRole.MEASUREMENT,
            address: s7 ? { case: "s7", value: { $typeName: "fabrica.config.v1.S7Address", area: S7Area.DATA_BLOCK, dbNumber: 1, byteOffset: 0 } as any } : { case: "modbus", value: { $typeName: "fabrica.config.v1.ModbusAddress", table: ModbusTable.HOLDING_REGISTER, address: 0 } as any },
          }));
          setPlc(c);
          setPage(Math.floor((c.tags.length - 1) / PAGE));
        }}>Add tag</button>}
        <span class="spacer" />
        {plc.tags.length > PAGE && (<>
          <button class="btn ghost small" type="button" disabled={page === 0} onClick={() => setPage(page - 1)}>‹</button>
          <span class="small">Tags {page * PAGE + 1}–{Math.min(plc.tags.length, page * PAGE + PAGE)} of {plc.tags.length}</span>
          <button class="btn ghost small" type="button" disabled={(page + 1) * PAGE >= plc.tags.length} onClick={() => setPage(page + 1)}>›</button>
        </>)}
      </div>
    </>
  );
}

function PlcEditor({ initial, onDone }: EditorProps) {
  const editing = !!initial;
  const profiles = useLoad(() => config.listDeviceProfiles({}), []);
  const collectors = useLoad(() => config.listCollectors({}), []);
  const [mode, setMode] = useState<"profile" | "hand">(editing ? "hand" : "profile");
  const [profileId, setProfileId] = useState("");
  const [prefix, setPrefix] = useState("");
  const [plc, setPlc] = useState<Plc>(() => initial ? clone(PlcSchema, initial) : (() => {
    const p = create(PlcSchema, { enabled: true, collectorId: "", pollGroups: [create(PollGroupSchema, { name: "default", pollInterval: { $typeName: "google.protobuf.Duration", seconds: 1n, nanos: 0 } as any })] });
    setConn(p, "modbusTcp", "", undefined, 1);
    return p;
  })());
  const [err, setErr] = useState<Problem | null>(null);
  const [probe, setProbe] = useState<ProbePlcResponse | null>(null);
  const [probing, setProbing] = useState(false);
  const [conflict, setConflict] = useState<Plc | null>(null);
  const [saving, setSaving] = useState(false);
  const profile: DeviceProfile | undefined = profiles.data?.profiles.find((p) => p.id === profileId);

  useEffect(() => {
    if (!plc.collectorId && collectors.data?.collectors[0]) setPlc((p) => { const c = clone(PlcSchema, p); c.collectorId = collectors.data!.collectors[0].id; return c; });
  }, [collectors.data]);

  // A profile names its protocol: the connection follows it (an S7 profile needs an S7 connection).
  useEffect(() => {
    if (!profile) return;
    const want: ConnKind | null = profile.protocol === Protocol.S7 ? "s7" : profile.protocol === Protocol.MODBUS ? (connKind(plc) === "s7" ? "modbusTcp" : null) : null;
    if (want && want !== connKind(plc)) { const f = connFields(plc); setPlc((p) => { const c = clone(PlcSchema, p); setConn(c, want, f.host, undefined, f.unit); return c; }); }
  }, [profile]);

  // Choosing a profile brings in its poll groups and tags (with the prefix) so they can be previewed; the save
  // sends only the connection and lets the service copy the profile.
  const draft = useMemo(() => {
    if (mode !== "profile" || !profile) return plc;
    const c = clone(PlcSchema, plc);
    c.pollGroups = profile.pollGroups.map((g) => clone(PollGroupSchema, g));
    c.tags = profile.tags.map((t) => { const x = clone(TagSchema, t); x.name = prefix + x.name; return x; });
    return c;
  }, [mode, profile, plc, prefix]);

  const kind = connKind(plc) ?? "modbusTcp";
  const cf = connFields(plc);
  const edit = (f: (p: Plc) => void) => { const c = clone(PlcSchema, plc); f(c); setPlc(c); };
  const cpath = `plc.${CONN_PATH[kind]}`;

  const runProbe = async () => {
    setProbing(true);
    try { setProbe(await collector.probePlc({ plc: draft })); setErr(null); } catch (e) { setErr(problem(e)); setProbe(null); } finally { setProbing(false); }
  };

  const save = async (e: Event) => {
    e.preventDefault();
    setSaving(true);
    try {
      let saved: Plc | undefined;
      if (editing) {
        const mask = create(FieldMaskSchema, { paths: ["display_name", "enabled", "collector_id", "connection", "tags"] });
        const local = await validate(PlcSchema, plc, "plc.");
        if (local) { setErr(local); return; }
        saved = (await config.updatePlc({ plc, updateMask: mask })).plc;
      } else if (mode === "profile") {
        if (!profile) { setErr({ code: Code.InvalidArgument, message: "", fields: { profile_id: "Choose a device profile." } }); return; }
        const body = clone(PlcSchema, plc);
        body.pollGroups = [];
        body.tags = [];
        saved = (await config.createPlcFromProfile({ profileId, plc: body, tagNamePrefix: prefix, requestId: crypto.randomUUID() })).plc;
      } else {
        const req = create(CreatePlcRequestSchema, { plc, requestId: crypto.randomUUID() });
        const local = await validate(CreatePlcRequestSchema, req);
        if (local) { setErr(local); return; }
        saved = (await config.createPlc(req)).plc;
      }
      setErr(null);
      refreshNames();
      onDone(saved);
    } catch (e2) {
      const pr = problem(e2);
      if (pr.code === Code.Aborted && editing) {
        // Someone saved this PLC since it was opened: show theirs next to ours, overwrite nothing.
        try { setConflict((await config.getPlc({ id: plc.id })).plc ?? null); } catch { /* the banner says enough */ }
      }
      setErr(pr);
    } finally {
      setSaving(false);
    }
  };

  return (
    <form class="form" onSubmit={save} data-testid="plc-editor">
      {!editing && (
        <div class="seg">
          <button type="button" class={`btn seg-btn ${mode === "profile" ? "active" : ""}`} onClick={() => setMode("profile")}>From a device profile</button>
          <button type="button" class={`btn seg-btn ${mode === "hand" ? "active" : ""}`} onClick={() => setMode("hand")}>By hand</button>
        </div>
      )}
      {!conflict && <ErrorBanner p={err} />}
      {conflict && (
        <div class="banner warn" data-testid="conflict">
          Someone else saved this PLC while you were editing (revision {conflict.revision.toString()}, {timeText(conflict.updateTime)}): display name “{conflict.displayName}”, {conflict.tags.length} tags, {connText(conflict)}.
          Your changes are still here and were not saved.
          <div class="form-actions">
            <button type="button" class="btn small" onClick={() => { const c = clone(PlcSchema, plc); c.etag = conflict.etag; setPlc(c); setConflict(null); setErr(null); }}>Keep mine over theirs</button>
            <button type="button" class="btn small ghost" onClick={() => { setPlc(clone(PlcSchema, conflict)); setConflict(null); setErr(null); }}>Load theirs</button>
          </div>
        </div>
      )}
      {mode === "profile" && !editing && (
        <div class="form-row">
          <Field label="Device profile" path="profile_id" p={err} wide>
            <select class="input" name="profile" value={profileId} onChange={(e) => setProfileId(e.currentTarget.value)}>
              <option value="">Choose…</option>
              {profiles.data?.profiles.map((p) => <option value={p.id}>{p.displayName}</option>)}
            </select>
          </Field>
          <Field label="Tag name prefix" path="tag_name_prefix" p={err} hint="Optional, e.g. line2.">
            <input class="input" name="prefix" value={prefix} onInput={(e) => setPrefix(e.currentTarget.value)} />
          </Field>
        </div>
      )}
      {profile && mode === "profile" && <p class="muted small">{profile.description}</p>}
      <div class="form-row">
        <Field label="Id" path="plc.id" p={err} hint={editing ? "Cannot change" : "Lower case letters, digits and dashes"}>
          <input class="input" name="id" value={plc.id} disabled={editing} onInput={(e) => edit((p) => { p.id = e.currentTarget.value; })} />
        </Field>
        <Field label="Name" path="plc.display_name" p={err}>
          <input class="input" name="displayName" value={plc.displayName} onInput={(e) => edit((p) => { p.displayName = e.currentTarget.value; })} />
        </Field>
        <Field label="Collector" path="plc.collector_id" p={err}>
          <input class="input" name="collectorId" list="collector-ids" value={plc.collectorId} onInput={(e) => edit((p) => { p.collectorId = e.currentTarget.value; })} />
          <datalist id="collector-ids">{collectors.data?.collectors.map((c) => <option value={c.id} />)}</datalist>
        </Field>
        <label class="field check"><input type="checkbox" checked={plc.enabled} onChange={(e) => edit((p) => { p.enabled = e.currentTarget.checked; })} /> <span>Enabled</span></label>
      </div>
      <div class="form-row">
        <Field label="Connection" path="plc.connection" p={err}>
          <select class="input" name="connection" value={kind} disabled={mode === "profile" && profile?.protocol === Protocol.S7} onChange={(e) => edit((p) => setConn(p, e.currentTarget.value as ConnKind, cf.host, cf.port, cf.unit, cf.rack, cf.slot))}>
            {(Object.keys(CONN_WORDS) as ConnKind[]).map((k) => <option value={k}>{CONN_WORDS[k]}</option>)}
          </select>
        </Field>
        <Field label="Host" path={`${cpath}.host`} p={err}>
          <input class="input" name="host" value={cf.host} placeholder="192.168.10.21" onInput={(e) => edit((p) => setConn(p, kind, e.currentTarget.value, cf.port, cf.unit, cf.rack, cf.slot))} />
        </Field>
        <Field label="Port" path={`${cpath}.port`} p={err} hint={kind === "s7" ? "102 when empty" : kind === "modbusTcp" ? "502 when empty" : ""}>
          <input class="input w-num" name="port" inputMode="numeric" value={cf.port ?? ""} onInput={(e) => { const v = e.currentTarget.value.trim(); edit((p) => setConn(p, kind, cf.host, v === "" ? undefined : Number(v), cf.unit, cf.rack, cf.slot)); }} />
        </Field>
        {kind === "s7" ? (<>
          <Field label="Rack" path={`${cpath}.rack`} p={err}><input class="input w-num" inputMode="numeric" value={cf.rack} onInput={(e) => edit((p) => setConn(p, kind, cf.host, cf.port, cf.unit, Number(e.currentTarget.value) || 0, cf.slot))} /></Field>
          <Field label="Slot" path={`${cpath}.slot`} p={err}><input class="input w-num" inputMode="numeric" value={cf.slot} onInput={(e) => edit((p) => setConn(p, kind, cf.host, cf.port, cf.unit, cf.rack, Number(e.currentTarget.value) || 0))} /></Field>
        </>) : (
          <Field label="Unit id" path={`${cpath}.unit_id`} p={err}><input class="input w-num" inputMode="numeric" value={cf.unit} onInput={(e) => edit((p) => setConn(p, kind, cf.host, cf.port, Number(e.currentTarget.value) || 0))} /></Field>
        )}
        <div class="field"><span class="field-label">&nbsp;</span><button class="btn" type="button" disabled={probing} onClick={runProbe} data-testid="probe">{probing ? "Probing…" : "Probe connection"}</button></div>
      </div>
      {probe && (
        <div class={`banner ${probe.reachable ? "ok" : "error"} small`} data-testid="probe-result">
          {probe.reachable ? `Reachable: connected in ${latencyText(probe.connectLatency)}, a test read took ${latencyText(probe.readLatency)}.${probe.deviceInfo ? ` ${probe.deviceInfo}` : ""}` : `Not reachable: ${probe.error}`}
        </div>
      )}
      <h3>Tags {mode === "profile" && profile ? `from ${profile.displayName}` : ""}</h3>
      {draft.tags.length === 0 && mode === "profile" ? <Empty>Choose a profile to see its tags.</Empty> : <TagRows plc={draft} setPlc={setPlc} p={err} editable={mode === "hand"} />}
      <div class="form-actions">
        <button class="btn primary" type="submit" disabled={saving} data-testid="save-plc">{saving ? "Saving…" : editing ? "Save changes" : "Create PLC"}</button>
        <button class="btn ghost" type="button" onClick={() => onDone()}>Cancel</button>
        {editing && <span class="muted small">Editing revision {plc.revision.toString()} (etag {plc.etag})</span>}
      </div>
    </form>
  );
}

// ---- the screen ---------------------------------------------------------------------------------------------

function Plcs() {
  const names = useNames();
  const [editing, setEditing] = useState<Plc | null>(null);
  const [creating, setCreating] = useState(false);
  const [saved, setSaved] = useState("");
  const list = usePaged((t) => config.listPlcs({ pageSize: 50, pageToken: t }).then((r) => [r.plcs, r.nextPageToken] as [Plc[], string]), []);
  const collectors = useLoad(() => config.listCollectors({}), [], 5000);
  const applied = (p: Plc) => {
    const c = collectors.data?.collectors.find((x) => x.id === p.collectorId);
    if (!c) return <span class="muted">collector {p.collectorId} has not reported</span>;
    const st = c.plcStatuses.find((s) => s.plcId === p.id);
    return c.appliedRevision >= p.revision
      ? <span class="text-ok">applied (collector at r{c.appliedRevision.toString()}){st && !st.connected ? <span class="text-bad"> · not connected{st.error ? `: ${st.error}` : ""}</span> : null}</span>
      : <span class="text-warn">pending (collector at r{c.appliedRevision.toString()})</span>;
  };
  const done = (p?: Plc) => { setEditing(null); setCreating(false); if (p) setSaved(`Saved ${p.displayName || p.id} as revision ${p.revision}.`); list.reload(); collectors.reload(); };
  return (
    <>
      {saved && <div class="banner ok" data-testid="saved">{saved}</div>}
      {(creating || editing) && <Card title={editing ? `Edit ${editing.displayName || editing.id}` : "New PLC"}><PlcEditor key={editing?.id ?? "new"} initial={editing ?? undefined} onDone={done} /></Card>}
      <Card title="PLCs" actions={<Allowed role="engineer"><button class="btn primary" onClick={() => { setEditing(null); setCreating(true); setSaved(""); }} data-testid="new-plc">New PLC</button></Allowed>} testid="plc-config-list">
        <ErrorBanner p={list.err} />
        {list.items.length === 0 ? <Empty>No PLC yet.</Empty> : (
          <table class="table">
            <thead><tr><th>PLC</th><th>Connection</th><th class="num">Tags</th><th>Revision</th><th>Collector</th><th /></tr></thead>
            <tbody>
              {list.items.map((p) => (
                <tr data-plc={p.id}>
                  <td><Dot ok={p.enabled} warn={false} /> <strong>{p.displayName || p.id}</strong><div class="muted small">{p.id}{p.enabled ? "" : " · disabled"}</div></td>
                  <td class="small">{connText(p)}</td>
                  <td class="num">{p.tags.length}</td>
                  <td>r{p.revision.toString()}<div class="muted small">{agoText(p.updateTime)}</div></td>
                  <td class="small">{applied(p)}</td>
                  <td><Allowed role="engineer"><button class="btn small" onClick={async () => { setCreating(false); setSaved(""); setEditing((await config.getPlc({ id: p.id })).plc ?? p); }}>Edit</button></Allowed></td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
        {list.pager}
      </Card>
      <Card title="Collectors" testid="collectors">
        {(collectors.data?.collectors.length ?? 0) === 0 ? <Empty>No collector has reported yet.</Empty> : (
          <table class="table">
            <thead><tr><th>Collector</th><th>Applied revision</th><th>Last report</th><th>PLCs</th></tr></thead>
            <tbody>{collectors.data!.collectors.map((c) => (
              <tr><td><strong>{c.id}</strong></td><td>r{c.appliedRevision.toString()}</td><td>{agoText(c.reportTime)}</td>
                <td class="small">{c.plcStatuses.map((s) => <span class="chip-plain"><Dot ok={s.connected} /> {plcName(names, s.plcId)}</span>)}</td></tr>
            ))}</tbody>
          </table>
        )}
      </Card>
    </>
  );
}

export function Configuration({ params }: { params: URLSearchParams }) {
  const tab = params.get("tab") || "plcs";
  useNames();
  return (
    <div class="page">
      <div class="page-head">
        <h1>Configuration</h1>
        <div class="seg">
          <a class={`btn seg-btn ${tab === "plcs" ? "active" : ""}`} href="#/config?tab=plcs">PLCs and tags</a>
          <a class={`btn seg-btn ${tab === "master" ? "active" : ""}`} href="#/config?tab=master">Master data</a>
        </div>
      </div>
      {tab === "master" ? <MasterData /> : <Plcs />}
    </div>
  );
}
