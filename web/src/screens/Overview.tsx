import { OrderState, type Order } from "../gen/fabrica/production/v1/order_pb";
import { agoText, latencyText, STATE_WORDS } from "../format";
import { useAlarms, useCollectorStatus, useOrderBoard } from "../live";
import { AlarmState } from "../gen/fabrica/alarm/v1/alarm_pb";
import { Card, Dot, Empty, ErrorBanner, itemName, plcName, Progress, StreamBadge, useNames, useNow, wcName } from "../ui";

export function Overview() {
  const board = useOrderBoard();
  const alarms = useAlarms();
  const unacked = [...alarms.alarms.values()].filter((a) => a.state !== AlarmState.ACTIVE_ACKNOWLEDGED).length;
  const status = useCollectorStatus();
  const names = useNames();
  const now = useNow();
  const open = [...board.orders.values()]
    .filter((o) => o.state === OrderState.IN_PROGRESS || o.state === OrderState.PAUSED)
    .sort((a, b) => a.number.localeCompare(b.number));
  const plcs = status.data?.plcs ?? [];
  const connected = plcs.filter((p) => p.connected).length;
  return (
    <div class="page">
      <div class="page-head">
        <h1>Overview</h1>
        <StreamBadge state={board.state} why={board.why} />
      </div>
      <div class="tiles">
        <div class="tile"><span class="tile-label">Running orders</span><span class="tile-value" data-testid="kpi-running">{open.filter((o) => o.state === OrderState.IN_PROGRESS).length}</span></div>
        <div class="tile"><span class="tile-label">Paused</span><span class="tile-value">{open.filter((o) => o.state === OrderState.PAUSED).length}</span></div>
        <a class={`tile ${alarms.alarms.size ? "tile-warn" : ""}`} href="#/alarms" data-testid="kpi-alarms-tile"><span class="tile-label">Alarms</span>
          <span class="tile-value" data-testid="kpi-alarms">{alarms.state === "connecting" ? "—" : alarms.alarms.size}</span>
          <span class="tile-sub">{alarms.alarms.size ? `${unacked} unacknowledged` : "none active"}</span></a>
        <div class={`tile ${plcs.length && connected < plcs.length ? "tile-warn" : ""}`}><span class="tile-label">PLCs connected</span><span class="tile-value">{connected} / {plcs.length}</span></div>
        <div class={`tile ${status.data && !status.data.uplinkConnected ? "tile-warn" : ""}`}><span class="tile-label">Uplink to ingest</span>
          <span class="tile-value small">{status.data ? (status.data.uplinkConnected ? "connected" : "down") : "—"}</span>
          <span class="tile-sub">{status.data ? `${status.data.backlogReadings} readings waiting` : ""}</span></div>
      </div>
      <div class="grid-2">
        <Card title="Orders on the floor" actions={<a class="btn ghost small" href="#/orders">Order board</a>} testid="overview-orders">
          {open.length === 0 ? <Empty>No order is running.</Empty> : (
            <table class="table">
              <thead><tr><th>Order</th><th>Work centre</th><th class="w-40">Progress</th><th>State</th></tr></thead>
              <tbody>
                {open.map((o: Order) => (
                  <tr key={o.id} data-order={o.number}>
                    <td><strong>{o.number}</strong><div class="muted">{itemName(names, o.itemId)}</div></td>
                    <td>{wcName(names, o.workCenterId)}</td>
                    <td>
                      <Progress good={o.goodQuantity} scrap={o.scrapQuantity} planned={o.plannedQuantity} />
                      <div class="muted small" data-testid="progress-text">{o.goodQuantity.toString()} good · {o.scrapQuantity.toString()} scrap · of {o.plannedQuantity.toString()}</div>
                    </td>
                    <td><span class={`pill state-${o.state}`}>{STATE_WORDS[o.state]}</span></td>
                  </tr>
                ))}
              </tbody>
            </table>
          )}
        </Card>
        <Card title="PLCs" actions={<a class="btn ghost small" href="#/plant">Plant</a>} testid="overview-plcs">
          <ErrorBanner p={status.err} />
          {plcs.length === 0 && !status.err ? <Empty>The collector polls no PLC yet.</Empty> : (
            <table class="table">
              <thead><tr><th>PLC</th><th>State</th><th>Last good read</th><th>Latency</th></tr></thead>
              <tbody>
                {plcs.map((p) => (
                  <tr key={p.plcId} class="clickable" onClick={() => (location.hash = `#/plant?plc=${encodeURIComponent(p.plcId)}`)}>
                    <td><strong>{plcName(names, p.plcId)}</strong><div class="muted small">{p.tagCount} tags</div></td>
                    <td class="nowrap"><Dot ok={p.connected} warn={!!p.lastError} /> {p.connected ? (p.lastError ? "connected, with errors" : "connected") : "disconnected"}</td>
                    <td>{agoText(p.lastGoodReadTime, now)}</td>
                    <td>{latencyText(p.readLatency)}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          )}
        </Card>
      </div>
    </div>
  );
}
