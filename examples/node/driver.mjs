// A benchmark driver for llem.v1.LlemService written in another language than the server:
// Node + @grpc/grpc-js, the contract loaded at run time from proto/llem/v1/llem.proto (no
// generated code). Prints one JSON object per line; exits 1 with a message on stderr on any
// unexpected result.
//   npm ci --prefix examples/node
//   node examples/node/driver.mjs --server 127.0.0.1:50051 --model demo [--prompt TEXT]... [--max-output-tokens N]
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROTOS = path.join(HERE, "protos"); // health and google.rpc, written for this example
const USAGE = "usage: node driver.mjs --server HOST:PORT --model NAME [--prompt TEXT]... [--max-output-tokens N] [--timeout-s S]";
let opt;
try {
  ({ values: opt } = parseArgs({ options: {
    server: { type: "string" }, model: { type: "string" }, prompt: { type: "string", multiple: true },
    "max-output-tokens": { type: "string", default: "8" }, "timeout-s": { type: "string", default: "120" },
  } }));
} catch (err) { console.error(`${err.message}\n${USAGE}`); process.exit(2); }
const maxOut = Number(opt["max-output-tokens"]);
if (!opt.server || !opt.model || !Number.isInteger(maxOut) || maxOut < 1 || !(Number(opt["timeout-s"]) > 0)) {
  console.error(USAGE);
  process.exit(2);
}

const def = protoLoader.loadSync(["llem/v1/llem.proto", "grpc/health/v1/health.proto"], {
  includeDirs: [path.resolve(HERE, "../../proto"), PROTOS],
  keepCase: true, // field names exactly as the proto (and the server's error messages) spell them
  // int64 fields (random_seed, *_bytes, use_count) as decimal strings: exact past 2^53,
  // which Number is not.
  // (Token ids and token counts are int32: plain Numbers.)
  longs: String,
  enums: String, // enum values by name both ways ("DECODER_PRESET_DETERMINISTIC", "FINISH_REASON_STOP")
  // Decoded non-optional scalars come back with their zero (cache_hit false, energy.available
  // false) instead of undefined. proto3 `optional` fields are NOT filled in: protobufjs models
  // them as one-member oneofs, so an absent one stays absent (no key) and a present one, even
  // holding 0/false, has its key (plus a "_name" marker key, from oneofs below). Every measured
  // figure (energy.total_j, uncertainty_j, duration_s, cpu.energy_j, ...) is `optional`:
  // unmeasured energy has no total_j key at all, never a 0.
  defaults: true,
  oneofs: true, // GenerateStreamResponse.event names its set member: "chunk" or "final"
});
const pkg = grpc.loadPackageDefinition(def);
const creds = grpc.credentials.createInsecure();
const llem = new pkg.llem.v1.LlemService(opt.server, creds);
const health = new pkg.grpc.health.v1.Health(opt.server, creds);
// google.rpc.Status travels serialized in the grpc-status-details-bin trailer: no RPC returns
// it, so it is decoded with protobufjs itself (the library proto-loader is built on).
const rpcRoot = new protobuf.Root().loadSync(
  ["google/rpc/status.proto", "google/rpc/error_details.proto"].map((f) => path.join(PROTOS, f)), { keepCase: true });

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const fail = (msg) => { throw new Error(msg); };
const deadline = () => Date.now() + 1000 * Number(opt["timeout-s"]);
const unary = (client, method, req) => new Promise((resolve, reject) =>
  client[method](req, { deadline: deadline() }, (err, res) => (err ? reject(err) : resolve(res))));

// The request the benchmark sends. Unset fields are simply left out (undefined/null are not
// sent), which the server reads as "library default". A field set to 0/false IS sent, since
// every field here is proto3 `optional`: do_sample: false means greedy, where leaving it out
// would mean the library default (sampling).
const generateRequest = (extraDecoder = {}) => ({
  model: { model: opt.model, pytorch: { batch_size: 2 } },
  decoder: { do_sample: false, ...extraDecoder },
  prompts: opt.prompt ?? ["The energy of a GPU", "Hello"],
  max_output_tokens: maxOut,
  random_seed: "1234", // int64: a decimal string is exact for any seed
});

// Energy is absent with a reason where it cannot be measured: never report that as 0 J.
function energyOf(e) {
  if (!e) fail("the response carries no energy message");
  if (e.available) return { available: true, total_j: e.total_j, uncertainty_j: e.uncertainty_j, method: e.method,
    low_confidence: e.low_confidence, ...("adjusted_j" in e ? { adjusted_j: e.adjusted_j } : {}) };
  if (!e.unavailable_reason) fail("energy is unavailable but gives no reason");
  if ("total_j" in e) fail(`energy is unavailable but carries total_j = ${e.total_j}`);
  return { available: false, unavailable_reason: e.unavailable_reason };
}

const summary = (r) => ({
  config_hash: r.config_hash, cache_hit: r.cache_hit, request_id: r.request_id,
  completions: r.completions.map((c) => ({ index: c.index, text: c.text, token_ids: c.token_ids,
    output_tokens: c.output_tokens, finish_reason: c.finish_reason })),
  usage: { input_tokens: r.usage.input_tokens, output_tokens: r.usage.output_tokens },
  energy: energyOf(r.energy),
  random_seed: r.effective_config?.random_seed, generate_kwargs: r.effective_config?.generate_kwargs,
  warnings: r.warnings.map((w) => w.code),
});

// google.rpc.Status from the trailer, each google.protobuf.Any detail unpacked by its type URL
// ("type.googleapis.com/google.rpc.BadRequest") where this example knows the type.
function statusDetails(err) {
  const [bin] = err.metadata?.get("grpc-status-details-bin") ?? []; // grpc-js has base64-decoded it
  if (!bin) return [];
  const status = rpcRoot.lookupType("google.rpc.Status").decode(bin);
  return status.details.map((any) => {
    const name = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    const type = rpcRoot.lookup(name);
    return type instanceof protobuf.Type ? { type: name, ...type.toObject(type.decode(any.value)) } : { type: name };
  });
}

async function main() {
  const h = await unary(health, "Check", { service: "llem.v1.LlemService" });
  emit({ step: "health", service: "llem.v1.LlemService", status: h.status });
  if (h.status !== "SERVING") fail(`health is ${h.status}, not SERVING`);

  const info = await unary(llem, "GetServerInfo", {});
  emit({ step: "server_info", server_version: info.server_version, limits: info.limits,
    devices: info.devices.map((d) => ({ index: d.index, kind: d.kind, name: d.name, energy_sensor: d.energy_sensor })) });

  const unaryTexts = [];
  for (const call of [1, 2]) {
    const s = summary(await unary(llem, "Generate", generateRequest()));
    emit({ step: "generate", call, ...s });
    unaryTexts.push(s.completions.map((c) => c.text));
  }

  // A request the server must refuse: INVALID_ARGUMENT, with a BadRequest naming the field and
  // an ErrorInfo whose reason (llem.proto's header lists them) a program can branch on.
  try {
    await unary(llem, "Generate", generateRequest({ temperature: -1 }));
    fail("decoder.temperature = -1 was accepted");
  } catch (err) {
    if (err.code !== grpc.status.INVALID_ARGUMENT) throw err;
    const details = statusDetails(err);
    const bad = details.find((d) => d.type === "google.rpc.BadRequest");
    if (!bad) fail(`INVALID_ARGUMENT without a google.rpc.BadRequest detail: ${err.details}`);
    const why = details.find((d) => d.type === "google.rpc.ErrorInfo");
    emit({ step: "invalid_argument", code: err.code, code_name: "INVALID_ARGUMENT", message: err.details,
      reason: why?.reason, domain: why?.domain,
      field_violations: bad.field_violations, detail_types: details.map((d) => d.type) });
  }

  // GenerateStream: token chunks as they are produced, then one final message with the totals.
  const texts = {}, ids = {};
  let chunks = 0, final = null;
  for await (const msg of llem.GenerateStream(generateRequest(), { deadline: deadline() })) {
    if (final) fail("a stream message after the final one");
    if (msg.event === "chunk") {
      chunks += 1;
      texts[msg.chunk.index] = (texts[msg.chunk.index] ?? "") + msg.chunk.text;
      (ids[msg.chunk.index] ??= []).push(...msg.chunk.token_ids);
    } else if (msg.event === "final") final = summary(msg.final);
    else fail(`unexpected stream event ${msg.event}`);
  }
  if (!final) fail("the stream ended without a final message");
  const streamed = Object.values(ids).reduce((n, t) => n + t.length, 0);
  const totalsMatch = streamed === final.usage.output_tokens && final.completions.every((c) =>
    (texts[c.index] ?? "") === c.text && JSON.stringify(ids[c.index] ?? []) === JSON.stringify(c.token_ids));
  emit({ step: "stream", chunks, streamed_tokens: streamed, text: final.completions.map((c) => texts[c.index] ?? ""),
    totals_match: totalsMatch, same_text_as_generate: JSON.stringify(final.completions.map((c) => c.text)) ===
      JSON.stringify(unaryTexts[0]), final });
  if (!totalsMatch) fail("streamed tokens/text differ from the final message's totals");
  emit({ step: "done", ok: true });
}

main().then(() => { llem.close(); health.close(); }, (err) => {
  const what = err.code !== undefined ? `${grpc.status[err.code] ?? err.code}: ${err.details}` : err.message;
  console.error(`driver.mjs: FAILED: ${what}`);
  process.exit(1);
});
