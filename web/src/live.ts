// Live data the screens share: the order board (WatchOrders, resumed from its revision) and the collector's
// status (polled: it is a small unary call on the collector's admin API), and the active alarms (WatchAlarms,
// resumed from its cursor).
import { useEffect, useState } from "preact/hooks";
import { alarm, collector, keepStreaming, production, type StreamState } from "./api";
import { AlarmState, type Alarm } from "./gen/fabrica/alarm/v1/alarm_pb";
import type { Order } from "./gen/fabrica/production/v1/order_pb";
import type { GetStatusResponse } from "./gen/fabrica/collector/v1/collector_service_pb";
import { useLoad } from "./ui";

export type Board = { orders: Map<string, Order>; state: StreamState; why?: string; revision: bigint };

/** Every open order and today's closed ones, live. A broken stream resumes after the last revision seen. */
export function useOrderBoard(workCenterId = ""): Board {
  const [board, setBoard] = useState<Board>({ orders: new Map(), state: "connecting", revision: 0n });
  useEffect(() => {
    let revision = 0n;
    let orders = new Map<string, Order>();
    return keepStreaming(
      (signal) => production.watchOrders({ workCenterId, afterRevision: revision }, { signal }),
      (m) => {
        if (m.snapshot) orders = new Map();
        else orders = new Map(orders);
        for (const o of m.orders) orders.set(o.id, o);
        if (m.revision > revision) revision = m.revision;
        setBoard({ orders, state: "live", revision });
      },
      (state, why) => setBoard((b) => ({ ...b, state, why })),
    );
  }, [workCenterId]);
  return board;
}

/** The collector's view of its PLCs, every `ms`. */
export function useCollectorStatus(ms = 2000) {
  return useLoad<GetStatusResponse>(() => collector.getStatus({}), [], ms);
}

// ---- alarms -----------------------------------------------------------------------------------------------

export type AlarmBoard = { alarms: Map<string, Alarm>; state: StreamState; why?: string; cursor: bigint };

export const alarmKey = (a: { ruleId: string; tagId: bigint }) => `${a.ruleId}/${a.tagId}`;

// One WatchAlarms stream for every component that shows alarms (the nav's badge, Overview, the Alarms screen),
// open while at least one of them is mounted; a broken stream resumes after the last cursor seen.
let alarmBoard: AlarmBoard = { alarms: new Map(), state: "connecting", cursor: 0n };
const alarmListeners = new Set<(b: AlarmBoard) => void>();
let closeAlarms: (() => void) | null = null;

function setAlarmBoard(b: AlarmBoard) {
  alarmBoard = b;
  alarmListeners.forEach((l) => l(b));
}

function openAlarms() {
  let cursor = 0n;
  let alarms = new Map<string, Alarm>();
  closeAlarms = keepStreaming(
    (signal) => alarm.watchAlarms({ afterCursor: cursor }, { signal }),
    (m) => {
      if (m.kind.case === "snapshot") {
        alarms = new Map(m.kind.value.alarms.map((a) => [alarmKey(a), a]));
      } else if (m.kind.case === "change" && m.kind.value.alarm) {
        const a = m.kind.value.alarm;
        alarms = new Map(alarms);
        if (a.state === AlarmState.NORMAL) alarms.delete(alarmKey(a));
        else alarms.set(alarmKey(a), a);
      }
      if (m.cursor > cursor) cursor = m.cursor;
      setAlarmBoard({ alarms, state: "live", cursor });
    },
    (state, why) => setAlarmBoard({ ...alarmBoard, state, why }),
  );
}

/** The alarms that are not normal, live (WatchAlarms: a snapshot, then every change). */
export function useAlarms(): AlarmBoard {
  const [board, setBoard] = useState<AlarmBoard>(alarmBoard);
  useEffect(() => {
    alarmListeners.add(setBoard);
    if (!closeAlarms) openAlarms();
    setBoard(alarmBoard);
    return () => {
      alarmListeners.delete(setBoard);
      if (alarmListeners.size === 0 && closeAlarms) {
        closeAlarms();
        closeAlarms = null;
        alarmBoard = { alarms: new Map(), state: "connecting", cursor: 0n };
      }
    };
  }, []);
  return board;
}
