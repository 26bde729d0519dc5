// Drives one agent session through memsvc from Node.js, the way an agent in
// another language would: @grpc/grpc-js for the calls, @grpc/proto-loader for
// the contract in proto/ (no generated code), protobufjs for error details.
//
//   node flow.mjs <host:port> [project_id agent_instance_id session_id]
//
// Credentials come from the variables memsvc's own CLI reads (docs/cli.md):
// MEMSVC_TOKEN_FILE (a file holding the bearer token, sent with every call as
// `authorization: Bearer <token>`), MEMSVC_TLS_CA (TLS, trusting this CA) and
// MEMSVC_TLS_CERT + MEMSVC_TLS_KEY (mutual TLS). With a token, the flow also checks
// that a call without it is UNAUTHENTICATED and reports what a call in another
// project gets (PERMISSION_DENIED when the token is bound to the flow's project).
//
// Flow: WatchLifecycle (from now, filtered to the project) is opened first;
// then Spawn (with initial entries), Set and Get, Pause, a Set while paused
// (must fail: FAILED_PRECONDITION, ERROR_REASON_SESSION_NOT_WRITABLE), Resume,
// Get (the value is back), Terminate (an episode id), GetEpisode. The watch must
// have delivered SPAWNED, PAUSED, RESUMED, CHECKPOINT_DELETED (the Terminate
// deletes the Pause's checkpoint), TERMINATED for the session, in order, with
// increasing sequences; a second watch from afterSequence = the PAUSED event must
// resume exactly at RESUMED.
//
// Success: one JSON summary on stdout, exit status 0. Any mismatch: a message
// on stderr, exit status 1.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { isDeepStrictEqual } from "node:util";
import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
// The repository's contract; MEMSVC_PROTO_DIR points elsewhere if needed.
const PROTO_DIR = process.env.MEMSVC_PROTO_DIR ?? path.resolve(HERE, "..", "..", "proto");
const CALL_DEADLINE_MS = 5_000; // every unary call
const WATCH_WAIT_MS = 10_000; // waiting for one stream message
const OVERALL_DEADLINE_MS = 30_000; // the whole program, so a hang never outlives the test

class FlowError extends Error {}

function check(condition, message, detail) {
  if (!condition) {
    const suffix = detail === undefined ? "" : `: ${JSON.stringify(detail)}`;
    throw new FlowError(message + suffix);
  }
}

// ---------------------------------------------------------------- the contract

function loadContract() {
  // Field names come camelCased (projectId), as is usual in JavaScript: the
  // well-known types (google/protobuf/*.proto) come with protobufjs, already
  // camelCased, and `keepCase: true` would not apply to them, so a snake_case
  // `string_value` would be silently dropped (an empty Value). longs: String
  // keeps int64 sequences exact. oneofs: Value and the watch response name
  // their set member in a virtual field, `kind`.
  const definition = protoLoader.loadSync(
    [
      "memsvc/v1/working_memory.proto",
      "memsvc/v1/lifecycle.proto",
      "memsvc/v1/episodic.proto",
      "memsvc/v1/errors.proto",
    ],
    { includeDirs: [PROTO_DIR], longs: String, enums: String, defaults: true, oneofs: true },
  );
  const v1 = grpc.loadPackageDefinition(definition).memsvc.v1;
  const reasons = definition["memsvc.v1.ErrorReason"].type.value.map((v) => v.name);
  return { v1, reasons: new Set(reasons) };
}

// google.rpc.Status as sent in the `grpc-status-details-bin` trailer. Only the
// fields read here are declared; Any is spelled out (same wire format) so no
// other .proto file has to be found at run time.
const RPC_TYPES = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`).root;
const STATUS = RPC_TYPES.lookupType("google.rpc.Status");
const ERROR_INFO = RPC_TYPES.lookupType("google.rpc.ErrorInfo");

// The google.rpc.ErrorInfo of a failed call, decoded from its trailers.
function errorInfoOf(error) {
  const [raw] = error.metadata?.get("grpc-status-details-bin") ?? [];
  check(raw !== undefined, "the error has no grpc-status-details-bin trailer", error.details);
  const status = STATUS.decode(raw);
  check(status.code === error.code, "the status in the trailer disagrees with the call's code", {
    trailer: status.code,
    call: error.code,
  });
  const detail = status.details.find((d) => d.typeUrl.endsWith("/google.rpc.ErrorInfo"));
  check(
    detail !== undefined,
    "no google.rpc.ErrorInfo among the details",
    status.details.map((d) => d.typeUrl),
  );
  return ERROR_INFO.toObject(ERROR_INFO.decode(detail.value), { defaults: true });
}

// ------------------------------------------------------- JSON <-> protobuf Value

// A JSON-like JavaScript value as a google.protobuf.Value message.
function toValue(json) {
  if (json === null) return { nullValue: "NULL_VALUE" };
  if (Array.isArray(json)) return { listValue: { values: json.map(toValue) } };
  switch (typeof json) {
    case "number":
      return { numberValue: json };
    case "string":
      return { stringValue: json };
    case "boolean":
      return { boolValue: json };
    case "object":
      return {
        structValue: { fields: Object.fromEntries(Object.entries(json).map(([k, v]) => [k, toValue(v)])) },
      };
    default:
      throw new FlowError(`not a JSON value: ${typeof json}`);
  }
}

// The JSON-like JavaScript value held by a google.protobuf.Value message.
function fromValue(value) {
  switch (value?.kind) {
    case "nullValue":
      return null;
    case "numberValue":
      return value.numberValue;
    case "stringValue":
      return value.stringValue;
    case "boolValue":
      return value.boolValue;
    case "listValue":
      return value.listValue.values.map(fromValue);
    case "structValue":
      return Object.fromEntries(Object.entries(value.structValue.fields).map(([k, v]) => [k, fromValue(v)]));
    default:
      throw new FlowError(`an empty or unknown google.protobuf.Value: ${JSON.stringify(value)}`);
  }
}

// ------------------------------------------------------------------ calls

const deadline = (ms = CALL_DEADLINE_MS) => ({ deadline: new Date(Date.now() + ms) });

// ------------------------------------------------------------------ credentials

// The bearer token (from MEMSVC_TOKEN_FILE), or null.
function readToken() {
  const file = process.env.MEMSVC_TOKEN_FILE;
  if (!file) return null;
  const token = readFileSync(file, "ascii").trim();
  check(/^[\x21-\x7e]+$/.test(token), `${file} must hold one token`);
  return token;
}

const TOKEN = readToken();

// The metadata of each call: the token, unless `anonymous` (to check the refusal).
// grpc-js only attaches call credentials to secure channels, so the header is set
// here, the same way for plaintext and TLS.
function callMetadata({ anonymous = false } = {}) {
  const metadata = new grpc.Metadata();
  if (TOKEN !== null && !anonymous) metadata.set("authorization", `Bearer ${TOKEN}`);
  return metadata;
}

// TLS from MEMSVC_TLS_CA (and the client certificate for mutual TLS), else plaintext.
function channelCredentials() {
  const { MEMSVC_TLS_CA: ca, MEMSVC_TLS_CERT: cert, MEMSVC_TLS_KEY: key } = process.env;
  if (!ca && !cert) return grpc.credentials.createInsecure();
  check(Boolean(cert) === Boolean(key), "MEMSVC_TLS_CERT and MEMSVC_TLS_KEY go together");
  const read = (file) => (file ? readFileSync(file) : null);
  return grpc.credentials.createSsl(read(ca), read(key), read(cert));
}

// A unary call as a promise; errors keep grpc-js's ServiceError (code, metadata).
function unary(client, method, request, options = {}) {
  return new Promise((resolve, reject) => {
    client[method](request, callMetadata(options), deadline(), (error, response) => {
      if (error) {
        error.message = `${method}: ${error.message}`;
        reject(error);
      } else {
        resolve(response);
      }
    });
  });
}

// A call that must fail with `code`; returns the error.
async function expectFailure(promise, code, what) {
  try {
    const response = await promise;
    throw new FlowError(
      `${what} succeeded but must fail with ${grpc.status[code]}: ${JSON.stringify(response)}`,
    );
  } catch (error) {
    if (error instanceof FlowError) throw error;
    check(
      error.code === code,
      `${what} must fail with ${grpc.status[code]}, got ${grpc.status[error.code]}`,
      error.details,
    );
    return error;
  }
}

// ------------------------------------------------------------------ watching

// One WatchLifecycle stream, read message by message with a timeout each, so
// the flow can wait for "the next message" without callbacks.
class Watch {
  constructor(client, request) {
    this.queue = [];
    this.waiters = [];
    this.failure = null;
    this.cancelled = false;
    this.call = client.WatchLifecycle(request, callMetadata(), deadline(OVERALL_DEADLINE_MS));
    this.call.on("data", (message) => this.push(message));
    this.call.on("error", (error) => {
      // Our own cancel() ends the stream with CANCELLED: that is the normal end.
      if (!(this.cancelled && error.code === grpc.status.CANCELLED)) this.fail(error);
    });
    this.call.on("end", () => this.fail(new FlowError("the watch stream ended")));
  }

  push(message) {
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve(message);
    else this.queue.push(message);
  }

  fail(error) {
    this.failure ??= error;
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
  }

  // The next message (an event or a progress), or an error after `ms`.
  next(ms = WATCH_WAIT_MS) {
    if (this.queue.length) return Promise.resolve(this.queue.shift());
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.resolve !== done);
        reject(new FlowError(`no watch message within ${ms} ms`));
      }, ms);
      const done = (message) => {
        clearTimeout(timer);
        resolve(message);
      };
      this.waiters.push({
        resolve: done,
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
    });
  }

  // The next event (progress messages in between are skipped).
  async nextEvent(ms = WATCH_WAIT_MS) {
    const until = Date.now() + ms;
    for (;;) {
      const message = await this.next(Math.max(1, until - Date.now()));
      if (message.kind === "event") return message.event;
    }
  }

  cancel() {
    this.cancelled = true;
    this.call.cancel();
  }
}

// ------------------------------------------------------------------ the flow

function parseArguments(argv) {
  const [address, projectId, agentInstanceId, sessionId] = argv;
  check(address, "usage: node flow.mjs <host:port> [project_id agent_instance_id session_id]");
  return {
    address,
    ids: {
      projectId: projectId ?? randomUUID(),
      agentInstanceId: agentInstanceId ?? randomUUID(),
      sessionId: sessionId ?? `node-${randomUUID().slice(0, 8)}`,
    },
  };
}

// The first message of every watch is a progress naming its start position;
// waiting for it means the stream is positioned before anything we do next.
async function openWatch(client, request) {
  const watch = new Watch(client, request);
  const first = await watch.next();
  check(first.kind === "progress", "the first watch message must be a progress", first);
  return { watch, startsAfter: first.progress.sequence };
}

const PLAN = {
  steps: ["search", "summarise"],
  budget: 2.5,
  done: false,
  owner: null,
  nested: { depth: [1, [2]] },
};
const GOAL = "answer the question";

async function run({ address, ids }) {
  const { v1, reasons } = loadContract();
  const credentials = channelCredentials();
  // grpc-js would route even 127.0.0.1 through an http_proxy set in the
  // environment (CI runners often have one); memsvc is reached directly.
  const options = { "grpc.enable_http_proxy": 0 };
  const lifecycle = new v1.LifecycleService(address, credentials, options);
  const memory = new v1.WorkingMemoryService(address, credentials, options);
  const episodic = new v1.EpisodicMemoryService(address, credentials, options);
  const clients = [lifecycle, memory, episodic];
  const watches = [];
  try {
    // 0. With a token: a call without it is refused, and one in another project gets
    //    whatever the token allows there (reported for the test to judge).
    const access = TOKEN === null ? null : await checkAccess(lifecycle, ids, reasons);

    // 1. Watch first, from now, for this project only.
    const live = await openWatch(lifecycle, { projectId: ids.projectId, start: "WATCH_START_NOW" });
    watches.push(live.watch);

    // 2. Spawn with one initial entry; write and read a structured value.
    const spawned = await unary(lifecycle, "Spawn", {
      ...ids,
      initialEntries: [{ key: "goal", value: toValue(GOAL) }],
      metadata: { fields: { client: toValue("node") } },
    });
    check(
      spawned.session.state === "SESSION_STATE_ACTIVE",
      "Spawn must return an ACTIVE session",
      spawned.session,
    );
    check(spawned.initialEntriesWritten === 1, "Spawn must write the initial entry", spawned);

    const set = await unary(memory, "Set", {
      ...ids,
      key: "plan",
      value: toValue(PLAN),
      ttl: { seconds: "3600", nanos: 0 },
    });
    check(set.created === true && set.expireTime !== null, "Set must create the key with an expiry", set);
    await expectValue(memory, ids, "plan", PLAN);
    await expectValue(memory, ids, "goal", GOAL);

    // 3. Pause: writes are refused, with the machine-readable reason.
    const paused = await unary(lifecycle, "Pause", ids);
    check(
      paused.session.state === "SESSION_STATE_PAUSED",
      "Pause must return a PAUSED session",
      paused.session,
    );
    check(paused.checkpoint.keyCount === "2", "the checkpoint must hold both keys", paused.checkpoint);
    const refused = await expectFailure(
      unary(memory, "Set", { ...ids, key: "plan", value: toValue("overwritten while paused") }),
      grpc.status.FAILED_PRECONDITION,
      "Set while paused",
    );
    const info = errorInfoOf(refused);
    check(info.reason === "ERROR_REASON_SESSION_NOT_WRITABLE", "wrong ErrorInfo reason", info);
    check(reasons.has(info.reason), "the reason must be a memsvc.v1.ErrorReason name", info.reason);
    check(info.domain === "memsvc.dev", "wrong ErrorInfo domain", info);
    check(
      info.metadata.state === "paused" && info.metadata.session_id === ids.sessionId,
      "wrong ErrorInfo metadata",
      info,
    );
    await expectValue(memory, ids, "plan", PLAN); // reads still work while paused

    // 4. Resume from the pause's checkpoint: the working memory is back.
    const resumed = await unary(lifecycle, "Resume", ids);
    check(
      resumed.session.state === "SESSION_STATE_ACTIVE",
      "Resume must return an ACTIVE session",
      resumed.session,
    );
    check(
      resumed.checkpoint.checkpointId === paused.checkpoint.checkpointId,
      "Resume must use the pause's checkpoint",
      resumed,
    );
    check(resumed.entriesRestored === 2, "Resume must restore both entries", resumed);
    await expectValue(memory, ids, "plan", PLAN);

    // 5. Terminate into an episode, and read the episode back.
    const terminated = await unary(lifecycle, "Terminate", {
      ...ids,
      lessonsLearned: ["watch before acting"],
    });
    check(
      terminated.session.state === "SESSION_STATE_TERMINATED",
      "Terminate must return a TERMINATED session",
      terminated,
    );
    check(terminated.episodeId !== "", "Terminate must record an episode", terminated);
    const { episode } = await unary(episodic, "GetEpisode", {
      projectId: ids.projectId,
      episodeId: terminated.episodeId,
    });
    check(
      episode.sessionId === ids.sessionId &&
        episode.agentInstanceId === ids.agentInstanceId &&
        episode.taskType === "session_completion" &&
        isDeepStrictEqual(episode.lessonsLearned, ["watch before acting"]),
      "GetEpisode must return the session's episode",
      episode,
    );

    // 6. The live watch saw the four transitions, in order.
    const events = await collectEvents(live.watch, 5);
    checkLifecycleEvents(events, ids, { paused, resumed, terminated }, live.startsAfter);

    // 7. Reconnecting after the PAUSED event resumes exactly at RESUMED.
    const pausedEvent = events[1];
    const again = await openWatch(lifecycle, {
      projectId: ids.projectId,
      afterSequence: pausedEvent.sequence,
    });
    watches.push(again.watch);
    check(
      again.startsAfter === pausedEvent.sequence,
      "the resumed watch must start after the cursor",
      again.startsAfter,
    );
    const replayed = await collectEvents(again.watch, 3);
    check(
      isDeepStrictEqual(
        replayed.map((e) => e.eventId),
        events.slice(2).map((e) => e.eventId),
      ),
      "the resumed watch must deliver RESUMED, CHECKPOINT_DELETED, TERMINATED, nothing before",
      replayed.map((e) => [e.sequence, e.eventType]),
    );

    // snake_case, as the proto fields, for the Python test that reads it.
    const brief = (e) => ({ sequence: e.sequence, event_type: e.eventType });
    return {
      ok: true,
      address,
      project_id: ids.projectId,
      agent_instance_id: ids.agentInstanceId,
      session_id: ids.sessionId,
      checkpoint_id: paused.checkpoint.checkpointId,
      episode_id: terminated.episodeId,
      paused_write: { code: grpc.status[refused.code], reason: info.reason, state: info.metadata.state },
      watch_started_after: live.startsAfter,
      events: events.map(brief),
      resumed_watch_started_after: again.startsAfter,
      resumed_watch: replayed.map(brief),
      tls: Boolean(process.env.MEMSVC_TLS_CA || process.env.MEMSVC_TLS_CERT),
      access,
      grpc_js_version: grpcVersion(),
    };
  } finally {
    for (const watch of watches) watch.cancel();
    for (const client of clients) client.close();
  }
}

// What the server says to a call without the token, and to one in another project.
async function checkAccess(lifecycle, ids, reasons) {
  const anonymous = await expectFailure(
    unary(lifecycle, "GetSession", ids, { anonymous: true }),
    grpc.status.UNAUTHENTICATED,
    "GetSession without a token",
  );
  const refusal = errorInfoOf(anonymous);
  check(reasons.has(refusal.reason), "the reason must be a memsvc.v1.ErrorReason name", refusal);
  let otherProject;
  try {
    await unary(lifecycle, "ListSessions", { projectId: randomUUID() });
    otherProject = { code: "OK", reason: "" };
  } catch (error) {
    if (error instanceof FlowError || error.metadata === undefined) throw error;
    otherProject = { code: grpc.status[error.code], reason: errorInfoOf(error).reason };
  }
  return {
    without_token: { code: grpc.status[anonymous.code], reason: refusal.reason },
    other_project: otherProject,
  };
}

async function expectValue(memory, ids, key, expected) {
  const { entry } = await unary(memory, "Get", { ...ids, key });
  const actual = fromValue(entry.value);
  check(isDeepStrictEqual(actual, expected), `Get ${key} must return the stored value`, { expected, actual });
}

async function collectEvents(watch, count) {
  const events = [];
  while (events.length < count) events.push(await watch.nextEvent());
  return events;
}

function checkLifecycleEvents(events, ids, { paused, resumed, terminated }, startsAfter) {
  const summary = events.map((e) => [e.sequence, e.eventType, e.sessionId]);
  check(
    isDeepStrictEqual(
      events.map((e) => e.eventType),
      [
        "EVENT_TYPE_SESSION_SPAWNED",
        "EVENT_TYPE_SESSION_PAUSED",
        "EVENT_TYPE_SESSION_RESUMED",
        "EVENT_TYPE_CHECKPOINT_DELETED",
        "EVENT_TYPE_SESSION_TERMINATED",
      ],
    ),
    "the watch must deliver SPAWNED, PAUSED, RESUMED, CHECKPOINT_DELETED, TERMINATED",
    summary,
  );
  for (const event of events) {
    check(
      event.projectId === ids.projectId &&
        event.agentInstanceId === ids.agentInstanceId &&
        event.sessionId === ids.sessionId,
      "an event of another session came through the filter",
      event,
    );
  }
  // Sequences are strings (int64 as longs: String); compare them as BigInt.
  const sequences = [BigInt(startsAfter), ...events.map((e) => BigInt(e.sequence))];
  check(
    sequences.every((s, i) => i === 0 || s > sequences[i - 1]),
    "sequences must increase past the start",
    summary,
  );
  check(
    events[1].checkpointId === paused.checkpoint.checkpointId,
    "the PAUSED event must name the checkpoint",
    events[1],
  );
  check(
    events[2].checkpointId === resumed.checkpoint.checkpointId,
    "the RESUMED event must name the checkpoint",
    events[2],
  );
  check(
    events[3].checkpointId === paused.checkpoint.checkpointId,
    "the CHECKPOINT_DELETED event must name the Pause's checkpoint",
    events[3],
  );
  check(
    events[4].episodeId === terminated.episodeId,
    "the TERMINATED event must name the episode",
    events[4],
  );
}

// Recorded in the summary, so a report says which client was used.
function grpcVersion() {
  return createRequire(import.meta.url)("@grpc/grpc-js/package.json").version;
}

// ------------------------------------------------------------------ main

const watchdog = setTimeout(() => {
  console.error(`flow.mjs: no result after ${OVERALL_DEADLINE_MS} ms`);
  process.exit(1);
}, OVERALL_DEADLINE_MS);
watchdog.unref();

try {
  const summary = await run(parseArguments(process.argv.slice(2)));
  console.log(JSON.stringify(summary));
} catch (error) {
  const where =
    error instanceof FlowError
      ? "mismatch"
      : `error${error.code === undefined ? "" : ` (${grpc.status[error.code]})`}`;
  console.error(`flow.mjs: ${where}: ${error.message}`);
  process.exitCode = 1;
}
