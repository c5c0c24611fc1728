// Live data the screens share: the order board (WatchOrders, resumed from its revision) and the collector's
// status (polled: it is a small unary call on the collector's admin API).
import { useEffect, useState } from "preact/hooks";
import { collector, keepStreaming, production, type StreamState } from "./api";
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
