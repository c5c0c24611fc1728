import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import "uplot/dist/uPlot.min.css";
import "./styles.css";
import { allPages, ALL_TENANTS, auth, config, TENANT_HEADER } from "./api";
import { useAuth, useLoad } from "./ui";
import type { Tenant } from "./gen/fabrica/config/v1/tenant_pb";
import { Overview } from "./screens/Overview";
import { Plant } from "./screens/Plant";
import { Trend } from "./screens/Trend";
import { Orders } from "./screens/Orders";
import { Downtime } from "./screens/Downtime";
import { Configuration } from "./screens/Configuration";
import { Alarms } from "./screens/Alarms";
import { useAlarms } from "./live";
import { Login } from "./screens/Login";

type Route = { path: string; params: URLSearchParams };

function parse(): Route {
  const h = location.hash.replace(/^#/, "") || "/";
  const [path, q] = h.split("?");
  return { path: path || "/", params: new URLSearchParams(q ?? "") };
}

const NAV: [string, string, string][] = [
  ["/", "Overview", "M3 12h7V3H3zm11 9h7v-9h-7zM3 21h7v-7H3zM14 3v7h7V3z"],
  ["/plant", "Plant", "M4 20V9l5 3V9l5 3V4h6v16z"],
  ["/trend", "Trend", "M3 17l6-6 4 4 8-8M15 7h6v6"],
  ["/orders", "Orders", "M6 3h12v18H6zM9 8h6M9 12h6M9 16h4"],
  ["/alarms", "Alarms", "M6 17V11a6 6 0 1 1 12 0v6l2 2H4zM10 21h4"],
  ["/downtime", "Downtime", "M12 7v5l3 3M12 3a9 9 0 1 0 0 18 9 9 0 0 0 0-18z"],
  ["/config", "Configuration", "M12 9a3 3 0 1 0 0 6 3 3 0 0 0 0-6zM19 12l2-1-2-4-2 1-2-2V4h-4v2l-2 2-2-1-2 4 2 1v0l-2 1 2 4 2-1 2 2v2h4v-2l2-2 2 1 2-4z"],
];

/** The nav's count of alarms still to see to (active, or cleared but not acknowledged). */
function AlarmCount() {
  const n = useAlarms().alarms.size;
  return n ? <span class="nav-count" data-testid="nav-alarm-count" title={`${n} alarm${n === 1 ? "" : "s"} to see to`}>{n}</span> : null;
}

/**
 * The tenant an installation-wide identity works in: every tenant of ListTenants (asked across tenants, so it
 * answers whichever tenant is picked), by code and name; picking one loads the page again in it. A tenant's
 * identity gets a label of its tenant (none for `default`, the only one of a single-company installation).
 */
function TenantPicker() {
  const wide = auth.installationWide;
  const tenants = useLoad<Tenant[]>(
    () => (wide ? allPages(async (t) => {
      const r = await config.listTenants({ pageSize: 500, pageToken: t }, { headers: { [TENANT_HEADER]: ALL_TENANTS } });
      return { items: r.tenants, next: r.nextPageToken };
    }) : Promise.resolve([])), [wide]);
  const chosen = auth.tenant;
  if (!wide) return chosen === "default" ? null : <span class="who-tenant" data-testid="tenant-label" title="Your company's tenant">{chosen}</span>;
  const list = tenants.data ?? [];
  return (
    <label class="tenant-pick" title={tenants.err ? tenants.err.message : "The tenant you work in"}>
      <span class="sr-only">Tenant</span>
      <select data-testid="tenant-picker" name="tenant" value={chosen} onChange={(e) => auth.chooseTenant(e.currentTarget.value)}>
        {!list.some((t) => t.code === chosen) && <option value={chosen}>{chosen}</option>}
        {list.map((t) => <option value={t.code}>{t.code}{t.name && t.name !== t.code ? ` · ${t.name}` : ""}{t.active ? "" : " (suspended)"}</option>)}
      </select>
    </label>
  );
}

function App() {
  const [route, setRoute] = useState(parse());
  const a = useAuth();
  useEffect(() => {
    const f = () => setRoute(parse());
    addEventListener("hashchange", f);
    return () => removeEventListener("hashchange", f);
  }, []);
  const showLogin = route.path === "/login" || (a.required && !a.identity);
  let screen;
  if (showLogin) screen = <Login />;
  else switch (route.path) {
    case "/plant": screen = <Plant params={route.params} />; break;
    case "/trend": screen = <Trend params={route.params} />; break;
    case "/orders": screen = <Orders />; break;
    case "/downtime": screen = <Downtime params={route.params} />; break;
    case "/alarms": screen = <Alarms />; break;
    case "/config": screen = <Configuration params={route.params} />; break;
    default: screen = <Overview />;
  }
  return (
    <div class="shell">
      <header class="topbar">
        <a class="brand" href="#/"><span class="brand-mark">F</span><span class="brand-name">Fabrica</span></a>
        <nav class="nav">
          {NAV.map(([p, label, icon]) => (
            <a href={`#${p}`} class={`nav-link ${route.path === p && !showLogin ? "active" : ""}`} data-nav={label}>
              <svg viewBox="0 0 24 24" width="18" height="18" aria-hidden="true"><path d={icon} /></svg>
              <span>{label}</span>
              {p === "/alarms" && !showLogin && <AlarmCount />}
            </a>
          ))}
        </nav>
        <div class="who">
          {a.identity ? (
            <>
              <TenantPicker />
              <span class="who-name" title={a.identity.roles.join(", ")}>{a.identity.sub || "signed in"} · {a.identity.roles.join(", ") || "no role"}</span>
              <button class="btn ghost small" onClick={() => auth.logout()}>Sign out</button>
            </>
          ) : (
            <a class="btn ghost small" href="#/login">Sign in</a>
          )}
        </div>
      </header>
      <main class="content">{screen}</main>
    </div>
  );
}

render(<App />, document.getElementById("app")!);
