// The whole FT-PrivacyScore flow from Node.js, with only the generated types (gen/) and Connect's
// gRPC transport: health checks, a task, uploads, the preparation stage, two contributors' records,
// a forced round, each contributor's scores, and one refused call with its ErrorInfo reason.
//
//   FTPS_GATEWAY_ADDR=127.0.0.1:50051 FTPS_REGISTRY_ADDR=... FTPS_SCORER_ADDR=... \
//   FTPS_BUILDER_TOKEN=... FTPS_CONTRIBUTOR_TOKENS=tokA,tokB node example.mjs DATA_DIR
//
// (or FTPS_TOKENS_FILE=tokens.json with {"builder": "...", "contributors": ["...", "..."]}).
// DATA_DIR holds manifest.json (task settings in protobuf JSON, file names and shapes), the base
// model (safetensors), the strategy (.py), and records as raw little-endian float32 / int64 files.
// Prints progress, then one JSON summary line; exits 1 with one line on any error.
// Plain JavaScript, type-checked against the generated .d.ts by `tsc -p .` (tsconfig.json).
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { endianness } from "node:os";
import { join } from "node:path";
import { create, fromJson } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { BlobKind, Dtype, RecordsSchema, RoundState, TaskSettingsSchema } from "./gen/ftps/v1/common_pb.js";
import { ContributorGatewayService } from "./gen/ftps/v1/gateway_pb.js";
import { BuilderRegistryService, UploadBlobRequestSchema, UploadBuilderDataRequestSchema } from "./gen/ftps/v1/registry_pb.js";
import { LiraScorerService, PreparationState } from "./gen/ftps/v1/scorer_pb.js";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "./gen/grpc/health/v1/health_pb.js";
/** @template {import("@bufbuild/protobuf").DescMessage} D @typedef {import("@bufbuild/protobuf").MessageInitShape<D>} MessageInitShape */

const CHUNK = 1024 * 1024; // UploadBlob chunks (the server takes up to 4 MiB)
const RECORDS_PER_CHUNK = 64; // UploadBuilderData chunks (the server takes up to 10,000 records)
const CALL = { timeoutMs: 60_000 };
const LONG = { timeoutMs: 30 * 60_000 };

// --- inputs (read in main, so that a missing one is a one-line error) -----------------------
const env = (name) => {
  if (!process.env[name]) throw new Error(`${name} is not set`);
  return process.env[name];
};
const dataDir = process.argv[2] ?? process.env.FTPS_DATA_DIR ?? ".";
const readFile = (name) => new Uint8Array(readFileSync(join(dataDir, name)));

// --- tensors: row-major raw little-endian bytes --------------------------------------------
const float32Tensor = (values, shape) =>
  ({ shape: shape.map(BigInt), dtype: Dtype.FLOAT32, data: new Uint8Array(Float32Array.from(values).buffer) });
const int64Tensor = (values, shape) =>
  ({ shape: shape.map(BigInt), dtype: Dtype.INT64, data: new Uint8Array(BigInt64Array.from(values).buffer) });
/** Records from the manifest's raw files: x float32 [m, ...], y int64 [m]. */
function loadRecords(entry) {
  const x = new Float32Array(readFile(entry.x.file).buffer);
  const y = new BigInt64Array(readFile(entry.y.file).buffer);
  return { x, y, shape: entry.x.shape, m: entry.y.shape[0] };
}
/** Records [from, to) of loaded records as a Records message. */
function records({ x, y, shape }, from, to) {
  const size = shape.slice(1).reduce((a, b) => a * b, 1);
  return create(RecordsSchema, {
    x: float32Tensor(x.subarray(from * size, to * size), [to - from, ...shape.slice(1)]),
    y: int64Tensor(y.subarray(from, to), [to - from]),
  });
}

// --- clients: plain gRPC over HTTP/2, a bearer token on every call ---------------------------
/** @template {import("@bufbuild/protobuf").DescService} S
 *  @param {S} service @param {string} addr @param {string} token
 *  @returns {import("@connectrpc/connect").Client<S>} */
function client(service, addr, token) {
  const bearer = (next) => (req) => { req.header.set("authorization", `Bearer ${token}`); return next(req); };
  return createClient(service, createGrpcTransport({ baseUrl: `http://${addr}`, interceptors: [bearer] }));
}

/** A server stream followed to its end; opened again when the server ended it early (idle or
 * maximum lifetime: status OK with trailer "ftps-stream-end"), the current state comes first.
 * @template T @param {(opts: import("@connectrpc/connect").CallOptions) => AsyncIterable<T>} open
 *  @param {(message: T) => boolean} [isLast] @returns {AsyncGenerator<T>} */
async function* follow(open, isLast = () => false) {
  for (;;) {
    let endedEarly = false;
    const opts = { ...LONG, onTrailer: (t) => { endedEarly = t.has("ftps-stream-end"); } };
    for await (const message of open(opts)) {
      yield message;
      if (isLast(message)) return;
    }
    if (!endedEarly) return;
  }
}

async function main() {
  /** @type {{ builder: string, contributors: string[] }} */
  const tokens = process.env.FTPS_TOKENS_FILE
    ? JSON.parse(readFileSync(process.env.FTPS_TOKENS_FILE, "utf8"))
    : { builder: env("FTPS_BUILDER_TOKEN"), contributors: env("FTPS_CONTRIBUTOR_TOKENS").split(",") };
  if (tokens.contributors.length !== 2) throw new Error("two contributor tokens are needed");
  const manifest = JSON.parse(readFileSync(join(dataDir, "manifest.json"), "utf8"));
  const [gatewayAddr, registryAddr, scorerAddr] =
    ["FTPS_GATEWAY_ADDR", "FTPS_REGISTRY_ADDR", "FTPS_SCORER_ADDR"].map(env);
  const registry = client(BuilderRegistryService, registryAddr, tokens.builder);
  const scorer = client(LiraScorerService, scorerAddr, tokens.builder);
  const builderGateway = client(ContributorGatewayService, gatewayAddr, tokens.builder);
  const contributors = tokens.contributors.map((t) => client(ContributorGatewayService, gatewayAddr, t));

  // 1. Health: the stock grpc.health.v1 service, asked about each of our services by its full name.
  if (endianness() !== "LE") throw new Error("this example builds tensors from native (little-endian) arrays");
  const healthy = [];
  for (const [{ typeName }, addr] of /** @type {const} */ ([[ContributorGatewayService, gatewayAddr],
                                       [BuilderRegistryService, registryAddr], [LiraScorerService, scorerAddr]])) {
    const res = await client(Health, addr, tokens.builder).check({ service: typeName }, CALL);
    if (res.status !== HealthCheckResponse_ServingStatus.SERVING) throw new Error(`${typeName} is not serving`);
    healthy.push(typeName);
  }
  console.log(`healthy: ${healthy.join(", ")}`);

  // 2. The builder creates a task (settings in the protobuf JSON mapping) and uploads its parts.
  const settings = fromJson(TaskSettingsSchema, manifest.settings);
  const task = await registry.createTask({ name: manifest.name, settings }, CALL);
  console.log(`task ${task.taskId}: n_models=${task.settings.nModels} shadow_models=${task.settings.shadowModels}`);
  for (const [kind, file] of [[BlobKind.BASE_MODEL, manifest.base_model], [BlobKind.STRATEGY, manifest.strategy]]) {
    const bytes = readFile(file);
    const sha256 = createHash("sha256").update(bytes).digest("hex");
    /** @returns {AsyncGenerator<MessageInitShape<typeof UploadBlobRequestSchema>>} */
    async function* parts() { // client stream: the header, then chunks of at most 1 MiB
      yield { part: { case: "header", value: { taskId: task.taskId, kind, size: BigInt(bytes.length), sha256 } } };
      for (let i = 0; i < bytes.length; i += CHUNK) yield { part: { case: "chunk", value: bytes.subarray(i, i + CHUNK) } };
    }
    const ref = await registry.uploadBlob(parts(), LONG); // the second half is checked with the first
    console.log(`uploaded ${BlobKind[kind]} ${file}: ${ref.size} bytes, version ${ref.version}`);
  }
  const builderData = loadRecords(manifest.builder_data);
  /** @returns {AsyncGenerator<MessageInitShape<typeof UploadBuilderDataRequestSchema>>} */
  async function* dataParts() { // client stream: the header, then Records chunks
    yield { part: { case: "header", value: { taskId: task.taskId } } };
    for (let i = 0; i < builderData.m; i += RECORDS_PER_CHUNK)
      yield { part: { case: "records", value: records(builderData, i, Math.min(i + RECORDS_PER_CHUNK, builderData.m)) } };
  }
  const dataRef = await registry.uploadBuilderData(dataParts(), LONG);
  console.log(`uploaded builder data: ${builderData.m} records, version ${dataRef.version}`);

  // 3. The preparation stage: a long-running operation, followed to READY.
  let prep = await scorer.startPreparation({ taskId: task.taskId }, CALL);
  for await (prep of follow((o) => scorer.watchPreparation({ taskId: task.taskId }, o),
                            (p) => p.state === PreparationState.READY || p.state === PreparationState.FAILED)) {
    const left = prep.modelsDone > 0 || prep.state !== PreparationState.PREPARING ? `${prep.remainingS.toFixed(1)} s` : "?";
    console.log(`preparation: ${prep.modelsDone}/${prep.modelsTotal} shadow models, ` +
                `${prep.elapsedS.toFixed(1)} s so far, about ${left} left`);
  }
  if (prep.state !== PreparationState.READY) throw new Error(`preparation ${PreparationState[prep.state]}: ${prep.message}`);
  console.log(`offline Gaussian: mu=${prep.gaussian.mu.toFixed(4)} sigma=${prep.gaussian.sigma.toFixed(4)} k=${prep.gaussian.k}`);

  // 4. Two contributors submit records; a retry with the same idempotency key is acknowledged once.
  const submissions = [];
  for (const [i, entry] of manifest.contributors.entries()) {
    const mine = loadRecords(entry);
    const request = { taskId: task.taskId, records: records(mine, 0, mine.m), idempotencyKey: `${entry.name}-first` };
    const sub = await contributors[i].submitRecords(request, CALL);
    const again = await contributors[i].submitRecords(request, CALL);
    if (again.submissionId !== sub.submissionId) throw new Error("the idempotency key was not honoured");
    console.log(`${sub.contributor}: submitted ${sub.recordIds.length} records (submission ${sub.submissionId})`);
    submissions.push(sub);
  }

  // 5. One refused call: a record with a NaN. The status carries google.rpc.ErrorInfo.
  let refused;
  try {
    const bad = loadRecords(manifest.contributors[0]);
    bad.x[0] = NaN;
    await contributors[0].submitRecords({ taskId: task.taskId, records: records(bad, 0, 1) }, CALL);
    throw new Error("a record with a NaN was accepted");
  } catch (err) {
    const e = ConnectError.from(err);
    if (e.code !== Code.InvalidArgument) throw err;
    const [info] = e.findDetails(ErrorInfoSchema);
    refused = { code: Code[e.code].replace(/[A-Z]/g, (c, i) => (i ? "_" : "") + c.toLowerCase()),
                reason: info?.reason, domain: info?.domain };
    console.log(`refused as expected: ${refused.code} ${refused.reason}: ${e.rawMessage}`);
  }

  // 6. The builder forces a round now and follows it to DONE.
  let round = await builderGateway.startRound({ taskId: task.taskId, force: true }, CALL);
  for await (round of follow((o) => builderGateway.watchRound({ roundId: round.roundId }, o),
                             (r) => r.state === RoundState.DONE || r.state === RoundState.FAILED)) {
    console.log(`round ${round.roundId}: ${RoundState[round.state]} ${round.modelsDone}/${round.modelsTotal} models`);
  }
  if (round.state !== RoundState.DONE) throw new Error(`round ${RoundState[round.state]}: ${round.message}`);

  // 7. Each contributor reads their scores of that round; the stream ends once all are delivered.
  const scores = {}, scoredIdsMatch = {};
  for (const [i, sub] of submissions.entries()) {
    const seen = new Map(); // a re-opened stream repeats what it sent: one score per record
    const request = { taskId: task.taskId, roundId: round.roundId };
    for await (const s of follow((o) => contributors[i].watchScores(request, o))) {
      if (seen.has(s.recordId)) continue;
      seen.set(s.recordId, s);
      console.log(`${s.contributor} ${s.recordId}: score ${s.score.toFixed(3)} ` +
                  `[${s.scoreCiLow.toFixed(3)}, ${s.scoreCiHigh.toFixed(3)}] counted_p ${s.countedP.toFixed(3)}`);
    }
    scores[sub.contributor] = seen.size;
    scoredIdsMatch[sub.contributor] = seen.size === sub.recordIds.length && sub.recordIds.every((id) => seen.has(id));
  }

  console.log(JSON.stringify({
    task_id: task.taskId, round_id: round.roundId, round_state: RoundState[round.state], healthy,
    preparation_state: PreparationState[prep.state], shadow_models: prep.gaussian.k,
    scores, scored_ids_match: scoredIdsMatch, refused,
  }));
}

main().then(() => process.exit(0), (err) => {
  const reason = err instanceof ConnectError ? err.findDetails(ErrorInfoSchema)[0]?.reason : undefined;
  const e = err instanceof ConnectError ? `${Code[err.code]}${reason ? ` [${reason}]` : ""}: ${err.rawMessage}`
    : err?.message ?? String(err);
  console.error(`example: error: ${e.replaceAll("\n", " ")}`);
  process.exit(1);
});
