// A Node program using the TypeScript client generated from the protos (web/src/gen, `make gen`) over the
// gRPC-Web transport a browser uses, against a real gateway: run by tests/web/test_node_client.py as
//   npx tsx tests/node-client.ts http://127.0.0.1:PORT
// It prints one JSON object per step on stdout (int64 values as strings), which the test checks:
//   anonymous ListDeviceProfiles without a token: UNAUTHENTICATED, its ErrorInfo decoded
//   unary   ListDeviceProfiles (every call from here on with the bearer token of FABRICA_TOKEN)
//   setup   CreateSector, CreateWorkCenter, CreateItem
//   stream  WatchOrders: the snapshot, then the order this program creates meanwhile, live
//   invalid CreatePlc with bad fields: first the client-side validation (@bufbuild/protovalidate, the same
//           rules), then the server's INVALID_ARGUMENT with its BadRequest and ErrorInfo details decoded
//   state   StartOrder twice: the state machine's FAILED_PRECONDITION, reason and message
//   deadline a watch with a 300 ms timeout ends DEADLINE_EXCEEDED
import { create } from "@bufbuild/protobuf";
import { pathToString } from "@bufbuild/protobuf/reflect";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { createValidator } from "@bufbuild/protovalidate";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import { ConfigService, CreatePlcRequestSchema } from "../src/gen/fabrica/config/v1/config_service_pb";
import { ProductionService } from "../src/gen/fabrica/production/v1/production_service_pb";
import { BadRequestSchema, ErrorInfoSchema } from "../src/gen/google/rpc/error_details_pb";

const baseUrl = process.argv[2];
if (!baseUrl) {
  console.error("usage: tsx tests/node-client.ts http://host:port");
  process.exit(2);
}

const token = process.env.FABRICA_TOKEN ?? "";
const bearer: Interceptor = (next) => async (req) => {
  if (token) req.header.set("authorization", `Bearer ${token}`);
  return await next(req);
};
const transport = createGrpcWebTransport({ baseUrl, useBinaryFormat: true, interceptors: [bearer] });
const anonymous = createClient(ConfigService, createGrpcWebTransport({ baseUrl, useBinaryFormat: true }));
const config = createClient(ConfigService, transport);
const production = createClient(ProductionService, transport);

function print(step: string, data: Record<string, unknown>): void {
  const text = JSON.stringify({ step, ...data }, (_key, value) =>
    typeof value === "bigint" ? value.toString() : value,
  );
  console.log(text);
}

function describe(err: unknown): Record<string, unknown> {
  const e = ConnectError.from(err);
  const [info] = e.findDetails(ErrorInfoSchema);
  return {
    code: Code[e.code],
    message: e.rawMessage,
    fieldViolations: e.findDetails(BadRequestSchema).flatMap((bad) =>
      bad.fieldViolations.map((v) => ({ field: v.field, description: v.description })),
    ),
    errorInfo: info ? { reason: info.reason, domain: info.domain, metadata: info.metadata } : null,
  };
}

async function main(): Promise<void> {
  // No token: refused by the service behind the gateway.
  try {
    await anonymous.listDeviceProfiles({});
    print("anonymous", { code: "OK" });
  } catch (err) {
    print("anonymous", describe(err));
  }

  // Unary.
  const profiles = await config.listDeviceProfiles({});
  print("unary", { profiles: profiles.profiles.map((p) => ({ id: p.id, displayName: p.displayName })) });

  // Master data for an order.
  await production.createSector({ sector: { id: "node", displayName: "Node sector" } });
  await production.createWorkCenter({
    workCenter: { id: "node-wc", displayName: "Node press", sectorId: "node" },
  });
  await production.createItem({
    item: { id: "NODE-ITEM", displayName: "Node bracket", idealCycleTime: durationFromMs(2000) },
  });
  print("setup", { ok: true });

  // Server stream: the snapshot, then a change made meanwhile.
  const abort = new AbortController();
  const watch = production.watchOrders({ workCenterId: "node-wc" }, { signal: abort.signal });
  let snapshot: Record<string, unknown> | null = null;
  let created: string | null = null;
  for await (const message of watch) {
    if (snapshot === null) {
      snapshot = { snapshot: message.snapshot, revision: message.revision, orders: message.orders.length };
      const order = await production.createOrder({
        order: { number: "NODE-1", itemId: "NODE-ITEM", workCenterId: "node-wc", plannedQuantity: 5n },
      });
      created = order.order?.id ?? null;
      continue;
    }
    const seen = message.orders.find((o) => o.id === created);
    if (seen) {
      print("stream", {
        first: snapshot,
        change: { revision: message.revision, snapshot: message.snapshot, id: seen.id, number: seen.number,
                  plannedQuantity: seen.plannedQuantity, workCenterId: seen.workCenterId },
      });
      abort.abort();
      break;
    }
  }

  // Client-side validation with the protos' rules, then the server's verdict on the same request.
  const invalid = create(CreatePlcRequestSchema, { plc: { id: "Bad Id!", displayName: "A PLC" } });
  const result = createValidator().validate(CreatePlcRequestSchema, invalid);
  const client = result.kind === "invalid"
    ? result.violations.map((v) => ({ field: pathToString(v.field), message: v.message, rule: v.ruleId }))
    : [];
  try {
    await config.createPlc(invalid);
    print("invalid", { client, server: null });
  } catch (err) {
    print("invalid", { client, server: describe(err) });
  }

  // The order state machine's refusal, in words.
  await production.startOrder({ id: created ?? "" });
  try {
    await production.startOrder({ id: created ?? "" });
    print("state", { server: null });
  } catch (err) {
    print("state", { server: describe(err) });
  }

  // A deadline: the watch ends when the client's timeout does.
  try {
    for await (const _ of production.watchOrders({}, { timeoutMs: 300 })) {
      // the snapshot; then nothing until the deadline
    }
    print("deadline", { code: "OK" });
  } catch (err) {
    print("deadline", { code: Code[ConnectError.from(err).code] });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
