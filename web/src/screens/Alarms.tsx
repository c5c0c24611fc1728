// The alarms that are not normal, live from WatchAlarms, with the operator's Acknowledge and Shelve; the recent
// alarm events (ListAlarmEvents) below, reloaded whenever the stream moves on.
import { useEffect, useRef, useState } from "preact/hooks";
import { create } from "@bufbuild/protobuf";
import { alarm as alarms, problem, validate, type Problem } from "../api";
import { AlarmEventType, AlarmState, type Alarm, type AlarmEvent } from "../gen/fabrica/alarm/v1/alarm_pb";
import { AcknowledgeAlarmRequestSchema, ShelveAlarmRequestSchema } from "../gen/fabrica/alarm/v1/alarm_service_pb";
import { Severity } from "../gen/fabrica/alarm/v1/rule_pb";
import { agoText, timeText, tsDate, valueText } from "../format";
import { alarmKey, useAlarms } from "../live";
import { Allowed, Card, Empty, ErrorBanner, plcName, refreshNames, StreamBadge, useLoad, useNames, useNow, type Names } from "../ui";

export const SEVERITY_WORDS: Record<Severity, string> = {
  [Severity.UNSPECIFIED]: "unknown",
  [Severity.LOW]: "low",
  [Severity.MEDIUM]: "medium",
  [Severity.HIGH]: "high",
  [Severity.CRITICAL]: "critical",
};

export const ALARM_STATE_WORDS: Record<AlarmState, string> = {
  [AlarmState.UNSPECIFIED]: "unknown",
  [AlarmState.NORMAL]: "normal",
  [AlarmState.ACTIVE_UNACKNOWLEDGED]: "active, unacknowledged",
  [AlarmState.ACTIVE_ACKNOWLEDGED]: "active, acknowledged",
  [AlarmState.CLEARED_UNACKNOWLEDGED]: "cleared, unacknowledged",
};

const EVENT_WORDS: Record<AlarmEventType, string> = {
  [AlarmEventType.UNSPECIFIED]: "unknown",
  [AlarmEventType.RAISED]: "raised",
  [AlarmEventType.CLEARED]: "cleared",
  [AlarmEventType.ACKNOWLEDGED]: "acknowledged",
  [AlarmEventType.SHELVED]: "shelved",
  [AlarmEventType.UNSHELVED]: "unshelved",
  [AlarmEventType.SUPPRESSED]: "suppressed",
};

const SHELVE_FOR: [string, number][] = [["15 min", 900], ["1 h", 3600], ["8 h", 8 * 3600], ["24 h", 86400]];

/** A tag's name and unit: the configuration's, else the name ingest reported with the alarm, else its id. */
function tagOf(names: Names | null, tagId: bigint, reported: string): { name: string; unit: string } {
  const t = names?.tags.get(tagId);
  return { name: t?.name || reported || `tag ${tagId}`, unit: t?.unit ?? "" };
}

function SeverityPill({ s }: { s: Severity }) {
  return <span class={`pill sev-${s}`} data-testid="severity">{SEVERITY_WORDS[s]}</span>;
}

/** The alarms an operator has still to see to, most severe and newest first. */
export function sortedAlarms(list: Iterable<Alarm>): Alarm[] {
  return [...list].sort((a, b) => b.severity - a.severity
    || (tsDate(b.raiseTime)?.getTime() ?? 0) - (tsDate(a.raiseTime)?.getTime() ?? 0));
}

function Acknowledge({ a }: { a: Alarm }) {
  const [open, setOpen] = useState(false);
  const [note, setNote] = useState("");
  const [err, setErr] = useState<Problem | null>(null);
  if (a.state !== AlarmState.ACTIVE_UNACKNOWLEDGED && a.state !== AlarmState.CLEARED_UNACKNOWLEDGED) return null;
  const submit = async (e: Event) => {
    e.preventDefault();
    const req = create(AcknowledgeAlarmRequestSchema, { ruleId: a.ruleId, tagId: a.tagId, note: note.trim(), etag: a.etag });
    const local = await validate(AcknowledgeAlarmRequestSchema, req);
    if (local) { setErr(local); return; }
    try { await alarms.acknowledgeAlarm(req); setErr(null); setOpen(false); setNote(""); } catch (e2) { setErr(problem(e2)); }
  };
  if (!open) return <button class="btn small primary" onClick={() => setOpen(true)} data-testid="acknowledge">Acknowledge</button>;
  return (
    <form class="alarm-act" onSubmit={submit} data-testid="acknowledge-form">
      <input class="input small" placeholder="Note (optional)" value={note} onInput={(e) => setNote(e.currentTarget.value)} aria-label="Note" />
      <button class="btn small primary" type="submit" data-testid="acknowledge-confirm">Acknowledge</button>
      <button class="btn small ghost" type="button" onClick={() => { setOpen(false); setErr(null); }}>Cancel</button>
      {err && <span class="field-error" role="alert">{err.fields.note ?? err.message}</span>}
    </form>
  );
}

function Shelve({ a }: { a: Alarm }) {
  const [err, setErr] = useState<Problem | null>(null);
  const shelve = async (sec: number) => {
    if (!sec) return;
    const req = create(ShelveAlarmRequestSchema, { ruleId: a.ruleId, tagId: a.tagId, duration: { seconds: BigInt(sec), nanos: 0 }, etag: a.etag });
    try { await alarms.shelveAlarm(req); setErr(null); } catch (e) { setErr(problem(e)); }
  };
  return (
    <span class="classify">
      <select class="input small" value="" onChange={(e) => shelve(Number(e.currentTarget.value))} aria-label="Shelve for" data-testid="shelve">
        <option value="">Shelve…</option>
        {SHELVE_FOR.map(([l, s]) => <option value={s}>for {l}</option>)}
      </select>
      {err && <span class="field-error" role="alert">{err.message}</span>}
    </span>
  );
}

export function Alarms() {
  const board = useAlarms();
  const names = useNames();
  const now = useNow(1000);
  const rules = useLoad(async () => {
    const out = new Map<string, string>();
    let token = "";
    do {
      const r = await alarms.listAlarmRules({ pageSize: 500, pageToken: token });
      for (const rule of r.rules) out.set(rule.id, rule.displayName);
      token = r.nextPageToken;
    } while (token && out.size < 5000);
    return out;
  }, [], 30000);
  // Every message of the stream is a new event: the list follows it (and is read every 15 s besides).
  const events = useLoad(() => alarms.listAlarmEvents({ pageSize: 50 }).then((r) => r.events), [board.cursor], 15000);
  const ruleName = (id: string) => rules.data?.get(id) || id;
  const list = sortedAlarms(board.alarms.values());
  // A rule created since the rules were read: read them again (once per unknown rule) for its name.
  const asked = useRef(new Set<string>());
  const unknown = list.map((a) => a.ruleId).filter((id) => rules.data && !rules.data.has(id) && !asked.current.has(id));
  useEffect(() => {
    if (!unknown.length) return;
    unknown.forEach((id) => asked.current.add(id));
    rules.reload();
  }, [unknown.join(",")]);
  // Likewise a PLC or tag the names do not know yet (created since they were read, or their read failed).
  const unnamed = names ? list.filter((a) => !names.tags.has(a.tagId)).map(alarmKey).filter((k) => !asked.current.has(k)) : [];
  useEffect(() => {
    if (!unnamed.length) return;
    unnamed.forEach((k) => asked.current.add(k));
    refreshNames();
  }, [unnamed.join(",")]);

  return (
    <div class="page">
      <div class="page-head">
        <h1>Alarms</h1>
        <StreamBadge state={board.state} why={board.why} />
      </div>
      <ErrorBanner p={rules.err} />
      <Card title={`Alarms to see to (${list.length})`} testid="active-alarms">
        {list.length === 0 ? <Empty>No alarm is active or waiting for acknowledgement.</Empty> : (
          <table class="table">
            <thead><tr><th>Severity</th><th>Alarm</th><th>PLC · tag</th><th>Value</th><th>State</th><th>Raised</th><th /></tr></thead>
            <tbody>
              {list.map((a) => {
                const tag = tagOf(names, a.tagId, a.tagName);
                const shelved = tsDate(a.shelvedUntil);
                return (
                  <tr key={alarmKey(a)} data-alarm={alarmKey(a)} data-rule={a.ruleId} class={`alarm-row sev-row-${a.severity}`}>
                    <td><SeverityPill s={a.severity} /></td>
                    <td><strong>{ruleName(a.ruleId)}</strong><div class="muted small">{a.message}</div></td>
                    <td>{plcName(names, a.plcId)}<div class="muted small" data-testid="tag-name">{tag.name}</div></td>
                    <td class="nowrap" data-testid="alarm-value">{valueText(a.value, tag.unit)}</td>
                    <td>
                      <span class={`pill alarm-state-${a.state}`} data-testid="alarm-state">{ALARM_STATE_WORDS[a.state]}</span>
                      {shelved && shelved.getTime() > now && <div class="muted small" data-testid="shelved">shelved until {timeText(a.shelvedUntil)}</div>}
                      {a.acknowledgedBy && a.state === AlarmState.ACTIVE_ACKNOWLEDGED && (
                        <div class="muted small" data-testid="acknowledged-by">by {a.acknowledgedBy}{a.acknowledgeNote ? `: ${a.acknowledgeNote}` : ""}</div>
                      )}
                    </td>
                    <td class="nowrap">{timeText(a.raiseTime)}<div class="muted small">{agoText(a.raiseTime, now)}</div></td>
                    <td class="nowrap">
                      <Allowed role="operator"><Acknowledge a={a} /> <Shelve a={a} /></Allowed>
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        )}
      </Card>
      <Card title="Recent alarm events" testid="alarm-events">
        <ErrorBanner p={events.err} />
        {(events.data ?? []).length === 0 ? <Empty>No alarm event yet.</Empty> : (
          <table class="table">
            <thead><tr><th>When</th><th>Event</th><th>Severity</th><th>Alarm</th><th>PLC · tag</th><th>Value</th><th>By</th><th>Note</th></tr></thead>
            <tbody>
              {[...(events.data ?? [])].sort((x, y) => Number(y.id - x.id)).map((ev: AlarmEvent) => {
                const tag = tagOf(names, ev.tagId, ev.tagName);
                return (
                  <tr key={ev.id.toString()} data-event={ev.id.toString()} data-rule={ev.ruleId}>
                    <td class="nowrap">{timeText(ev.eventTime)}</td>
                    <td><span class={`pill alarm-state-${ev.state}`} data-testid="event-type">{EVENT_WORDS[ev.type]}</span></td>
                    <td><SeverityPill s={ev.severity} /></td>
                    <td>{ruleName(ev.ruleId)}</td>
                    <td>{plcName(names, ev.plcId)}<div class="muted small">{tag.name}</div></td>
                    <td class="nowrap">{valueText(ev.value, tag.unit)}</td>
                    <td class="muted">{ev.actor}</td>
                    <td>{ev.note}</td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        )}
      </Card>
    </div>
  );
}
