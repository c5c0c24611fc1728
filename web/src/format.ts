// Turning protobuf values into what people read.
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { Duration } from "@bufbuild/protobuf/wkt";
import type { Value } from "./gen/fabrica/common/v1/reading_pb";
import { Quality } from "./gen/fabrica/common/v1/reading_pb";
import { OrderState } from "./gen/fabrica/production/v1/order_pb";

export function valueText(v: Value | undefined, unit = ""): string {
  if (!v) return "—";
  const k = v.kind;
  let s: string;
  switch (k.case) {
    case "boolValue": s = k.value ? "on" : "off"; break;
    case "intValue": case "uintValue": s = k.value.toString(); break;
    case "doubleValue": s = fmtNum(k.value); break;
    case "stringValue": s = JSON.stringify(k.value); break;
    case "bytesValue": s = `${k.value.length} bytes`; break;
    default: return "—";
  }
  return unit && k.case !== "boolValue" && k.case !== "stringValue" ? `${s} ${unit}` : s;
}

export function valueNumber(v: Value | undefined): number | null {
  if (!v) return null;
  const k = v.kind;
  switch (k.case) {
    case "boolValue": return k.value ? 1 : 0;
    case "intValue": case "uintValue": return Number(k.value);
    case "doubleValue": return k.value;
    default: return null;
  }
}

export function fmtNum(x: number, digits = 3): string {
  if (!Number.isFinite(x)) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a >= 1e7 || a < 1e-3)) return x.toExponential(2);
  return x.toLocaleString("en-GB", { maximumFractionDigits: a >= 100 ? 1 : digits });
}

export function pct(x: number | undefined): string {
  return x === undefined || !Number.isFinite(x) ? "—" : `${(x * 100).toFixed(1)} %`;
}

export function tsDate(t: Timestamp | undefined): Date | null {
  return t && (t.seconds !== 0n || t.nanos !== 0) ? timestampDate(t) : null;
}

export function timeText(t: Timestamp | undefined): string {
  const d = tsDate(t);
  if (!d) return "—";
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString("en-GB") : d.toLocaleString("en-GB");
}

export function agoText(t: Timestamp | undefined, now = Date.now()): string {
  const d = tsDate(t);
  if (!d) return "never";
  return durationWords((now - d.getTime()) / 1000) + " ago";
}

export function durationWords(sec: number): string {
  const s = Math.max(0, sec);
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
}

export function durSeconds(d: Duration | undefined): number {
  return d ? Number(d.seconds) + d.nanos / 1e9 : 0;
}

export function latencyText(d: Duration | undefined): string {
  if (!d) return "—";
  const ms = durSeconds(d) * 1000;
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
}

export const QUALITY_WORDS: Record<Quality, string> = {
  [Quality.UNSPECIFIED]: "unknown",
  [Quality.GOOD]: "good",
  [Quality.COMMUNICATION_FAILURE]: "no connection",
  [Quality.DECODE_FAILURE]: "decode failure",
  [Quality.STALE]: "stale",
  [Quality.CONFIG_ERROR]: "config error",
};

export const STATE_WORDS: Record<OrderState, string> = {
  [OrderState.UNSPECIFIED]: "unknown",
  [OrderState.PLANNED]: "planned",
  [OrderState.IN_PROGRESS]: "in progress",
  [OrderState.PAUSED]: "paused",
  [OrderState.COMPLETED]: "completed",
  [OrderState.CANCELLED]: "cancelled",
};

export function csvCell(v: unknown): string {
  const s = v === null || v === undefined ? "" : String(v);
  return /[",\n;]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

export function downloadCsv(name: string, header: string[], rows: unknown[][]): void {
  const text = [header, ...rows].map((r) => r.map(csvCell).join(",")).join("\r\n") + "\r\n";
  const url = URL.createObjectURL(new Blob([text], { type: "text/csv;charset=utf-8" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
