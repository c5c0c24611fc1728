// The one way the screens talk to Fabrica: gRPC-Web clients generated from protos/ (src/gen, by `make gen`),
// the bearer token and the tenant it works in (x-fabrica-tenant for an installation-wide identity), the decoding
// of error details, and resumable server streams.
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import type { Validator } from "@bufbuild/protovalidate";
import { pathToString } from "@bufbuild/protobuf/reflect";
import { ConfigService } from "./gen/fabrica/config/v1/config_service_pb";
import { IngestService } from "./gen/fabrica/ingest/v1/ingest_service_pb";
import { ProductionService } from "./gen/fabrica/production/v1/production_service_pb";
import { CollectorService } from "./gen/fabrica/collector/v1/collector_service_pb";
import { AlarmService } from "./gen/fabrica/alarm/v1/alarm_service_pb";
import { BadRequestSchema, ErrorInfoSchema, PreconditionFailureSchema } from "./gen/google/rpc/error_details_pb";

// ---- identity ---------------------------------------------------------------------------------------------

export type Role = "viewer" | "operator" | "engineer" | "admin";
const RANK: Record<Role, number> = { viewer: 1, operator: 2, engineer: 3, admin: 4 };
const TOKEN_KEY = "fabrica.token";

const TENANT_KEY = "fabrica.tenant";
/** The tenant claim of an installation-wide identity: it names the tenant of each call (header TENANT_HEADER). */
export const ALL_TENANTS = "*";
export const TENANT_HEADER = "x-fabrica-tenant";

/** Who the token names: `tenant` is its tenant claim (`default` without one), or `*` for the whole installation. */
export type Identity = { token: string; sub: string; roles: Role[]; exp?: number; tenant: string };

function decodeJwt(token: string): Identity | null {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const json = atob(parts[1].replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(parts[1].length / 4) * 4, "="));
    const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(json, (c) => c.charCodeAt(0))));
    const roles = (Array.isArray(claims.roles) ? claims.roles : typeof claims.roles === "string" ? claims.roles.split(/[ ,]+/) : [])
      .filter((r: string): r is Role => r in RANK);
    const tenant = typeof claims.tenant === "string" && claims.tenant ? claims.tenant : "default";
    return { token, sub: String(claims.sub ?? ""), roles, exp: typeof claims.exp === "number" ? claims.exp : undefined, tenant };
  } catch {
    return null;
  }
}

type Listener = () => void;
const listeners = new Set<Listener>();
let identity: Identity | null = (() => {
  const t = sessionStorage.getItem(TOKEN_KEY);
  return t ? decodeJwt(t) : null;
})();
/** True once a call was refused as UNAUTHENTICATED: the stack enforces auth and the login must be shown. */
let authRequired = false;
let refusedReason: string | null = null;

export const auth = {
  get identity() { return identity; },
  get required() { return authRequired; },
  /** Sets the token (a bearer JWT); returns a sentence when it cannot be read. */
  login(token: string): string | null {
    const id = decodeJwt(token.trim());
    if (!id) return "This is not a JSON Web Token: it must be three base64url parts separated by dots.";
    if (id.exp && id.exp * 1000 < Date.now()) return "This token has expired; ask for a new one.";
    identity = id;
    authRequired = false;
    refusedReason = null;
    sessionStorage.setItem(TOKEN_KEY, id.token);
    sessionStorage.removeItem(TENANT_KEY); // a new identity starts in tenant default
    listeners.forEach((l) => l());
    return null;
  },
  logout() {
    identity = null;
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(TENANT_KEY);
    listeners.forEach((l) => l());
  },
  /** Whether the identity is installation-wide (tenant `*`): it picks the tenant it works in. */
  get installationWide() { return identity?.tenant === ALL_TENANTS; },
  /** The tenant the calls work in: the identity's own, or the one an installation-wide identity picked. */
  get tenant(): string {
    if (identity?.tenant === ALL_TENANTS) return sessionStorage.getItem(TENANT_KEY) || "default";
    return identity?.tenant ?? "default";
  },
  /**
   * Works in tenant `code` from now on (installation-wide identities only). The page loads again: every
   * screen, cache and stream starts over in the new tenant, so nothing of the previous one stays on screen.
   */
  chooseTenant(code: string) {
    if (identity?.tenant !== ALL_TENANTS || code === auth.tenant) return;
    sessionStorage.setItem(TENANT_KEY, code);
    location.reload();
  },
  /** Whether the user may do what needs `role`. Without auth on the stack (no token, never refused) anyone may. */
  can(role: Role): boolean {
    if (!identity) return !authRequired;
    return identity.roles.some((r) => RANK[r] >= RANK[role]);
  },
  subscribe(l: Listener) { listeners.add(l); return () => { listeners.delete(l); }; },
  /** Why the last token was dropped: the services refused it (expired, not signed by their key, ...). */
  get refused() { return refusedReason; },
  markRequired(reason?: string) {
    // A token the services refused is no identity at all: forget it, so the login shows again.
    const dropped = identity !== null;
    if (dropped) {
      identity = null;
      sessionStorage.removeItem(TOKEN_KEY);
      refusedReason = reason || "The services refused this token.";
    }
    if (!authRequired || dropped) { authRequired = true; listeners.forEach((l) => l()); }
  },
};

const bearer: Interceptor = (next) => async (req) => {
  if (identity) req.header.set("authorization", `Bearer ${identity.token}`);
  // An installation-wide identity names the tenant of every call (a call may name its own, e.g. `*`); a
  // tenant's identity sends none: the services know its tenant from the token.
  if (identity?.tenant === ALL_TENANTS && !req.header.has(TENANT_HEADER)) req.header.set(TENANT_HEADER, auth.tenant);
  try {
    return await next(req);
  } catch (err) {
    if (err instanceof ConnectError && err.code === Code.Unauthenticated) auth.markRequired(err.rawMessage);
    throw err;
  }
};

// ---- clients ----------------------------------------------------------------------------------------------

const transport = createGrpcWebTransport({ baseUrl: new URL(".", location.href).pathname.replace(/\/$/, "") || "/", interceptors: [bearer] });

export const config: Client<typeof ConfigService> = createClient(ConfigService, transport);
export const ingest: Client<typeof IngestService> = createClient(IngestService, transport);
export const production: Client<typeof ProductionService> = createClient(ProductionService, transport);
export const collector: Client<typeof CollectorService> = createClient(CollectorService, transport);
export const alarm: Client<typeof AlarmService> = createClient(AlarmService, transport);

// ---- errors -----------------------------------------------------------------------------------------------

/** A failed call, as the screens show it: a sentence, and sentences per field (the request's field path). */
export type Problem = {
  code: Code;
  message: string;
  fields: Record<string, string>;
  reason?: string;
};

const CODE_WORDS: Partial<Record<Code, string>> = {
  [Code.Unavailable]: "The service cannot be reached; it may be restarting.",
  [Code.DeadlineExceeded]: "The service took too long to answer.",
  [Code.PermissionDenied]: "Your role does not allow this.",
  [Code.Unauthenticated]: "Sign in with a token to do this.",
  [Code.Unimplemented]: "This server does not offer this call.",
};

/** The refusals that are about the caller's tenant, not its role (ErrorInfo reason; metadata `tenant`). */
const TENANT_REASONS: Record<string, (tenant: string) => string> = {
  TENANT_INACTIVE: (t) => `Your company's account (tenant ${t}) is suspended; ask the installation's administrator.`,
  TENANT_MISMATCH: (t) => `Your identity belongs to tenant ${t} and works in it only; sign in with a token of the other tenant.`,
};

/** protovalidate's rule messages, said for people. */
function humane(s: string): string {
  return s
    .replace(/^value /, "")
    .replace(/^does not match regex pattern `.*`$/, "contains characters that are not allowed here")
    .replace(/^must be at least (\d+) characters$/, (_, n) => (n === "1" ? "is required" : `needs at least ${n} characters`))
    .replace(/^is required$/, "is required")
    .replace(/^must be greater than or equal to (\S+) and less than or equal to (\S+)$/, "must be from $1 to $2");
}

function sentence(s: string): string {
  const t = s.trim();
  if (!t) return t;
  return t[0].toUpperCase() + t.slice(1) + (/[.!?]$/.test(t) ? "" : ".");
}

/** Decodes a failed call: google.rpc.BadRequest field violations, ErrorInfo reason, PreconditionFailure. */
export function problem(err: unknown): Problem {
  const ce = ConnectError.from(err);
  // A stream's refusal arrives here, not in the interceptor: the login must show all the same.
  if (ce.code === Code.Unauthenticated) auth.markRequired(ce.rawMessage);
  const fields: Record<string, string> = {};
  const extra: string[] = [];
  let reason: string | undefined;
  for (const br of ce.findDetails(BadRequestSchema)) {
    for (const v of br.fieldViolations) {
      const text = sentence(humane(v.localizedMessage?.message || v.description || "is invalid"));
      fields[v.field] = fields[v.field] ? `${fields[v.field]} ${text}` : text;
    }
  }
  let reasonMeta: Record<string, string> = {};
  for (const info of ce.findDetails(ErrorInfoSchema)) if (reason === undefined) { reason = info.reason; reasonMeta = info.metadata; }
  for (const pf of ce.findDetails(PreconditionFailureSchema)) {
    for (const v of pf.violations) if (v.description) extra.push(sentence(v.description));
  }
  let message = sentence(ce.rawMessage) || CODE_WORDS[ce.code] || `The call failed (${Code[ce.code]}).`;
  if (ce.code === Code.Unavailable || ce.code === Code.PermissionDenied || ce.code === Code.Unauthenticated) {
    message = `${CODE_WORDS[ce.code]} ${ce.rawMessage ? sentence(ce.rawMessage) : ""}`.trim();
  }
  const tenantWords = ce.code === Code.PermissionDenied && reason ? TENANT_REASONS[reason] : undefined;
  if (tenantWords) message = tenantWords(reasonMeta.tenant || auth.tenant);
  for (const e of extra) if (!message.includes(e.replace(/\.$/, ""))) message += ` ${e}`;
  if (Object.keys(fields).length && ce.code === Code.InvalidArgument) message = fieldsSummary(fields);
  return { code: ce.code, message, fields, reason };
}

function fieldsSummary(fields: Record<string, string>): string {
  const names = Object.keys(fields).map((f) => f.split(".").slice(1).join(" ").replace(/_/g, " ").replace(/\[(\d+)\]/g, (_, i) => ` ${Number(i) + 1}`) || f);
  return `Please correct ${names.length === 1 ? "the field" : "the fields"} marked below (${names.join(", ")}).`;
}

/** The error of one field: exact path, or the first violation under it (e.g. "plc.modbus_tcp" covers its host). */
export function fieldError(p: Problem | null | undefined, path: string): string | undefined {
  if (!p) return undefined;
  if (p.fields[path]) return p.fields[path];
  const k = Object.keys(p.fields).find((f) => f.endsWith(`.${path}`) || f.startsWith(`${path}.`) || f.startsWith(`${path}[`));
  return k ? p.fields[k] : undefined;
}

// ---- client-side validation (the same protovalidate rules the services enforce) ----------------------------

// Loaded on first use (CEL and RE2 are most of its size), so the first screen does not wait for it.
let validator: Promise<Validator> | null = null;

/** Violations of `msg` by field path (as the server names them), or null when it is valid. */
export async function validate<D extends DescMessage>(schema: D, msg: MessageShape<D>, prefix = ""): Promise<Problem | null> {
  validator ??= import("@bufbuild/protovalidate").then((m) => m.createValidator());
  let result;
  try {
    result = (await validator).validate(schema, msg);
  } catch {
    return null; // the service checks it anyway
  }
  if (result.kind === "valid") return null;
  if (result.kind === "error") return null; // let the server judge what the browser cannot
  const fields: Record<string, string> = {};
  for (const v of result.violations) {
    const path = prefix + pathToString(v.field);
    fields[path] = sentence(humane(v.message));
  }
  return { code: Code.InvalidArgument, message: fieldsSummary(fields), fields };
}

// ---- resumable streams ------------------------------------------------------------------------------------

export type StreamState = "connecting" | "live" | "reconnecting";

/**
 * Keeps a server stream open: `open(signal)` starts it (from the revision or cursor the caller last saw),
 * every message goes to `onMessage`; when it breaks, `onState("reconnecting")` and it is opened again with
 * a growing delay (0.5 s to 5 s). Returns a function that closes it for good.
 */
export function keepStreaming<T>(
  open: (signal: AbortSignal) => AsyncIterable<T>,
  onMessage: (m: T) => void,
  onState: (s: StreamState, why?: string) => void,
): () => void {
  const ctl = new AbortController();
  (async () => {
    let delay = 500;
    onState("connecting");
    while (!ctl.signal.aborted) {
      try {
        for await (const m of open(ctl.signal)) {
          delay = 500;
          onState("live");
          onMessage(m);
        }
        if (ctl.signal.aborted) return;
        onState("reconnecting", "The stream ended.");
      } catch (err) {
        if (ctl.signal.aborted) return;
        onState("reconnecting", problem(err).message);
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 5000);
    }
  })();
  return () => ctl.abort();
}

/** Reads every page of a List call. */
export async function allPages<T>(
  page: (token: string) => Promise<{ items: T[]; next: string }>,
  limit = 5000,
): Promise<T[]> {
  const out: T[] = [];
  let token = "";
  do {
    const { items, next } = await page(token);
    out.push(...items);
    token = next;
  } while (token && out.length < limit);
  return out;
}
