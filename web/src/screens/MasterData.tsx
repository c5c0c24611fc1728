// Master data: sectors, work centres (with their PLC tag bindings), items (grouped by reference types), defect codes,
// downtime reasons.
// Create, and edit with the etag as read (a concurrent change is refused and shown, not overwritten).
import { useState } from "preact/hooks";
import { create, type DescMessage } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { durationFromMs, FieldMaskSchema } from "@bufbuild/protobuf/wkt";
import { production, problem, validate, type Problem } from "../api";
import {
  DefectCodeSchema, DowntimeReasonSchema, ItemSchema, ReferenceTypeSchema, SectorSchema, Severity, WorkCenterSchema,
  type DefectCode, type DowntimeReason, type Item, type ReferenceType, type Sector, type WorkCenter,
} from "../gen/fabrica/production/v1/master_data_pb";
import { TagRole } from "../gen/fabrica/common/v1/reading_pb";
import { durSeconds } from "../format";
import { Allowed, Card, Empty, ErrorBanner, Field, plcName, refreshNames, useAuth, usePaged, useNames } from "../ui";

type Kind = "workCenters" | "items" | "referenceTypes" | "defectCodes" | "downtimeReasons" | "sectors";
const KINDS: [Kind, string][] = [["workCenters", "Work centres"], ["items", "Items"], ["referenceTypes", "Reference types"], ["defectCodes", "Defect codes"], ["downtimeReasons", "Downtime reasons"], ["sectors", "Sectors"]];
const SEVERITY_WORDS: Record<number, string> = { [Severity.MINOR]: "minor", [Severity.MAJOR]: "major", [Severity.CRITICAL]: "critical" };

type Form = Record<string, string | boolean>;
type Any = Sector | WorkCenter | Item | ReferenceType | DefectCode | DowntimeReason;

function toForm(kind: Kind, x?: Any): Form {
  const a = (x ?? {}) as any;
  const base: Form = { id: a.id ?? "", display_name: a.displayName ?? "" };
  switch (kind) {
    case "workCenters": return { ...base, sector_id: a.sectorId ?? "", plc_id: a.plcId ?? "", production_counter_tag_id: a.productionCounterTagId?.toString() ?? "0", scrap_counter_tag_id: a.scrapCounterTagId?.toString() ?? "0", machine_state_tag_id: a.machineStateTagId?.toString() ?? "0", counter_width: String(a.counterWidth ?? 32) };
    case "items": return { ...base, ideal_cycle_time: a.idealCycleTime ? String(durSeconds(a.idealCycleTime)) : "", reference_type_id: a.referenceTypeId ?? "" };
    case "referenceTypes": return { ...base, description: a.description ?? "" };
    case "defectCodes": return { ...base, severity: String(a.severity ?? Severity.MINOR) };
    case "downtimeReasons": return { ...base, color: a.color ?? "#64748b", counts_against_availability: a.countsAgainstAvailability ?? true };
    default: return base;
  }
}

const big = (s: string | boolean) => (/^\d+$/.test(String(s)) ? BigInt(String(s)) : 0n);

function build(kind: Kind, f: Form): [DescMessage, any, string] {
  const id = String(f.id).trim(), displayName = String(f.display_name).trim();
  switch (kind) {
    case "sectors": return [SectorSchema, create(SectorSchema, { id, displayName }), "sector"];
    case "workCenters": return [WorkCenterSchema, create(WorkCenterSchema, {
      id, displayName, sectorId: String(f.sector_id), plcId: String(f.plc_id), productionCounterTagId: big(f.production_counter_tag_id),
      scrapCounterTagId: big(f.scrap_counter_tag_id), machineStateTagId: big(f.machine_state_tag_id), counterWidth: Number(f.counter_width) || 0,
    }), "work_center"];
    case "items": {
      const s = Number(f.ideal_cycle_time);
      return [ItemSchema, create(ItemSchema, { id, displayName, referenceTypeId: String(f.reference_type_id ?? ""), idealCycleTime: String(f.ideal_cycle_time).trim() === "" || !Number.isFinite(s) ? undefined : durationFromMs(Math.round(s * 1000)) }), "item"];
    }
    case "referenceTypes": return [ReferenceTypeSchema, create(ReferenceTypeSchema, { id, displayName, description: String(f.description ?? "") }), "reference_type"];
    case "defectCodes": return [DefectCodeSchema, create(DefectCodeSchema, { id, displayName, severity: Number(f.severity) }), "defect_code"];
    case "downtimeReasons": return [DowntimeReasonSchema, create(DowntimeReasonSchema, { id, displayName, color: String(f.color), countsAgainstAvailability: !!f.counts_against_availability }), "downtime_reason"];
  }
}

const EDITABLE: Record<Kind, string[]> = {
  sectors: ["display_name"],
  workCenters: ["display_name", "sector_id", "plc_id", "production_counter_tag_id", "scrap_counter_tag_id", "machine_state_tag_id", "counter_width"],
  items: ["display_name", "ideal_cycle_time", "reference_type_id"],
  referenceTypes: ["display_name", "description"],
  defectCodes: ["display_name", "severity"],
  downtimeReasons: ["display_name", "color", "counts_against_availability"],
};

async function save(kind: Kind, msg: any, existing: Any | undefined): Promise<void> {
  const mask = create(FieldMaskSchema, { paths: EDITABLE[kind] });
  if (existing) msg.etag = existing.etag;
  switch (kind) {
    case "sectors": existing ? await production.updateSector({ sector: msg, updateMask: mask }) : await production.createSector({ sector: msg }); break;
    case "workCenters": existing ? await production.updateWorkCenter({ workCenter: msg, updateMask: mask }) : await production.createWorkCenter({ workCenter: msg }); break;
    case "items": existing ? await production.updateItem({ item: msg, updateMask: mask }) : await production.createItem({ item: msg }); break;
    case "referenceTypes": existing ? await production.updateReferenceType({ referenceType: msg, updateMask: mask }) : await production.createReferenceType({ referenceType: msg }); break;
    case "defectCodes": existing ? await production.updateDefectCode({ defectCode: msg, updateMask: mask }) : await production.createDefectCode({ defectCode: msg }); break;
    case "downtimeReasons": existing ? await production.updateDowntimeReason({ downtimeReason: msg, updateMask: mask }) : await production.createDowntimeReason({ downtimeReason: msg }); break;
  }
}

function list(kind: Kind, token: string): Promise<[Any[], string]> {
  const q = { pageSize: 50, pageToken: token };
  switch (kind) {
    case "sectors": return production.listSectors(q).then((r) => [r.sectors, r.nextPageToken]);
    case "workCenters": return production.listWorkCenters(q).then((r) => [r.workCenters, r.nextPageToken]);
    case "items": return production.listItems(q).then((r) => [r.items, r.nextPageToken]);
    case "referenceTypes": return production.listReferenceTypes(q).then((r) => [r.referenceTypes, r.nextPageToken]);
    case "defectCodes": return production.listDefectCodes(q).then((r) => [r.defectCodes, r.nextPageToken]);
    case "downtimeReasons": return production.listDowntimeReasons(q).then((r) => [r.downtimeReasons, r.nextPageToken]);
  }
}

function TagSelect({ plcId, role, value, onChange, label }: { plcId: string; role: TagRole; value: string; onChange: (v: string) => void; label: string }) {
  const names = useNames();
  const tags = names?.plcs.get(plcId)?.tags.filter((t) => t.role === role) ?? [];
  return (
    <select class="input" value={value} onChange={(e) => onChange(e.currentTarget.value)} aria-label={label}>
      <option value="0">none</option>
      {tags.map((t) => <option value={t.id.toString()}>{t.name}</option>)}
    </select>
  );
}

function Editor({ kind, existing, onDone }: { kind: Kind; existing?: Any; onDone: () => void }) {
  const names = useNames();
  const [f, setF] = useState<Form>(toForm(kind, existing));
  const [err, setErr] = useState<Problem | null>(null);
  const [sectors] = useState(() => production.listSectors({ pageSize: 500 }));
  const [sectorList, setSectorList] = useState<Sector[]>([]);
  if (kind === "workCenters") sectors.then((r) => { if (r.sectors.length !== sectorList.length) setSectorList(r.sectors); }, () => undefined);
  const [referenceTypes] = useState(() => production.listReferenceTypes({ pageSize: 500 }));
  const [referenceTypeList, setReferenceTypeList] = useState<ReferenceType[]>([]);
  if (kind === "items") referenceTypes.then((r) => { if (r.referenceTypes.length !== referenceTypeList.length) setReferenceTypeList(r.referenceTypes); }, () => undefined);
  const set = (k: string) => (e: Event) => setF({ ...f, [k]: (e.currentTarget as HTMLInputElement).type === "checkbox" ? (e.currentTarget as HTMLInputElement).checked : (e.currentTarget as HTMLInputElement).value });
  const submit = async (e: Event) => {
    e.preventDefault();
    const [schema, msg, field] = build(kind, f);
    const local = await validate(schema, msg, `${field}.`);
    if (local) { setErr(local); return; }
    try { await save(kind, msg, existing); setErr(null); refreshNames(); onDone(); } catch (e2) {
      const p = problem(e2);
      if (p.code === Code.Aborted) p.message = `Someone else changed this since you opened it; nothing was saved. Close and open it again to see their version. (${p.message})`;
      setErr(p);
    }
  };
  const [, , field] = build(kind, f);
  const P = (k: string) => `${field}.${k}`;
  return (
    <form class="form" onSubmit={submit} data-testid={`edit-${kind}`}>
      <ErrorBanner p={err} />
      <div class="form-row">
        <Field label="Id" path={P("id")} p={err} hint={existing ? "Cannot change" : undefined}><input class="input" name="id" value={String(f.id)} disabled={!!existing} onInput={set("id")} /></Field>
        <Field label="Name" path={P("display_name")} p={err}><input class="input" name="display_name" value={String(f.display_name)} onInput={set("display_name")} /></Field>
        {kind === "items" && <Field label="Ideal cycle time (s)" path={P("ideal_cycle_time")} p={err} hint="Fastest time for one part"><input class="input w-num" name="ideal_cycle_time" inputMode="decimal" value={String(f.ideal_cycle_time)} onInput={set("ideal_cycle_time")} /></Field>}
        {kind === "items" && <Field label="Reference type" path={P("reference_type_id")} p={err}><select class="input" name="reference_type_id" value={String(f.reference_type_id)} onChange={set("reference_type_id")}><option value="">none</option>{referenceTypeList.map((r) => <option value={r.id}>{r.displayName}</option>)}</select></Field>}
        {kind === "referenceTypes" && <Field label="Description" path={P("description")} p={err}><input class="input" name="description" value={String(f.description)} onInput={set("description")} /></Field>}
        {kind === "defectCodes" && <Field label="Severity" path={P("severity")} p={err}><select class="input" value={String(f.severity)} onChange={set("severity")}>{Object.entries(SEVERITY_WORDS).map(([v, l]) => <option value={v}>{l}</option>)}</select></Field>}
        {kind === "downtimeReasons" && (<>
          <Field label="Colour" path={P("color")} p={err}><input class="input color" type="color" name="color" value={String(f.color)} onInput={set("color")} /></Field>
          <label class="field check"><input type="checkbox" checked={!!f.counts_against_availability} onChange={set("counts_against_availability")} /> <span>Counts against availability</span></label>
        </>)}
      </div>
      {kind === "workCenters" && (
        <div class="form-row">
          <Field label="Sector" path={P("sector_id")} p={err}><select class="input" name="sector_id" value={String(f.sector_id)} onChange={set("sector_id")}><option value="">Choose…</option>{sectorList.map((s) => <option value={s.id}>{s.displayName}</option>)}</select></Field>
          <Field label="PLC" path={P("plc_id")} p={err}><select class="input" name="plc_id" value={String(f.plc_id)} onChange={set("plc_id")}><option value="">none (book by hand)</option>{[...(names?.plcs.values() ?? [])].map((p) => <option value={p.id}>{p.displayName || p.id}</option>)}</select></Field>
          <Field label="Good-parts counter" path={P("production_counter_tag_id")} p={err}><TagSelect plcId={String(f.plc_id)} role={TagRole.PRODUCTION_COUNTER} value={String(f.production_counter_tag_id)} onChange={(v) => setF({ ...f, production_counter_tag_id: v })} label="Good-parts counter" /></Field>
          <Field label="Scrap counter" path={P("scrap_counter_tag_id")} p={err}><TagSelect plcId={String(f.plc_id)} role={TagRole.SCRAP_COUNTER} value={String(f.scrap_counter_tag_id)} onChange={(v) => setF({ ...f, scrap_counter_tag_id: v })} label="Scrap counter" /></Field>
          <Field label="Machine state" path={P("machine_state_tag_id")} p={err}><TagSelect plcId={String(f.plc_id)} role={TagRole.MACHINE_STATE} value={String(f.machine_state_tag_id)} onChange={(v) => setF({ ...f, machine_state_tag_id: v })} label="Machine state" /></Field>
          <Field label="Counter width" path={P("counter_width")} p={err}><select class="input" value={String(f.counter_width)} onChange={set("counter_width")}>{["16", "32", "64"].map((w) => <option value={w}>{w} bits</option>)}</select></Field>
        </div>
      )}
      <div class="form-actions"><button class="btn primary" type="submit">{existing ? "Save" : "Create"}</button><button class="btn ghost" type="button" onClick={onDone}>Cancel</button></div>
    </form>
  );
}

function describe(kind: Kind, x: Any, names: ReturnType<typeof useNames>): string {
  const a = x as any;
  switch (kind) {
    case "workCenters": return `${a.plcId ? `PLC ${plcName(names, a.plcId)}` : "booked by hand"} · ${a.sectorId}`;
    case "items": return `ideal cycle time ${durSeconds(a.idealCycleTime)} s${a.referenceTypeId ? ` · ${a.referenceTypeId}` : ""}`;
    case "referenceTypes": return a.description ?? "";
    case "defectCodes": return SEVERITY_WORDS[a.severity] ?? "";
    case "downtimeReasons": return a.countsAgainstAvailability ? "counts against availability" : "planned stop";
    default: return "";
  }
}

export function MasterData() {
  useAuth();
  const names = useNames();
  const [kind, setKind] = useState<Kind>("workCenters");
  const [editing, setEditing] = useState<Any | null | "new">(null);
  const data = usePaged((t) => list(kind, t), [kind]);
  return (
    <>
      <div class="tabs">{KINDS.map(([k, l]) => <button class={`tab ${k === kind ? "active" : ""}`} onClick={() => { setKind(k); setEditing(null); }} data-kind={k}>{l}</button>)}</div>
      {editing && <Card title={editing === "new" ? `New ${KINDS.find(([k]) => k === kind)![1].toLowerCase().replace(/s$/, "")}` : `Edit ${(editing as any).displayName}`}>
        <Editor key={editing === "new" ? "new" : (editing as any).id} kind={kind} existing={editing === "new" ? undefined : editing} onDone={() => { setEditing(null); data.reload(); }} />
      </Card>}
      <Card title={KINDS.find(([k]) => k === kind)![1]} actions={<Allowed role="engineer"><button class="btn primary" onClick={() => setEditing("new")} data-testid="new-master">New</button></Allowed>}>
        <ErrorBanner p={data.err} />
        {data.items.length === 0 ? <Empty>None yet.</Empty> : (
          <table class="table">
            <thead><tr><th>Name</th><th>Id</th><th>Details</th><th /></tr></thead>
            <tbody>
              {data.items.map((x) => (
                <tr data-id={(x as any).id}>
                  <td>{kind === "downtimeReasons" && <span class="reason-swatch" style={{ background: (x as DowntimeReason).color }} />} <strong>{(x as any).displayName}</strong></td>
                  <td class="muted">{(x as any).id}</td>
                  <td class="small">{describe(kind, x, names)}</td>
                  <td><Allowed role="engineer"><button class="btn small" onClick={() => setEditing(x)}>Edit</button></Allowed></td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
        {data.pager}
      </Card>
    </>
  );
}
