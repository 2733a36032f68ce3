#!/usr/bin/env node
// The official Spice.ai JavaScript SDK (@spiceai/spice, pinned in package.json) as a test client: the
// one script every test drives it through (tests/jsclient.py, run_sdk).
//
//   node tests/js/sdk_client.mjs '<job JSON>'      or      echo '<job JSON>' | node tests/js/sdk_client.mjs
//
// The job. Connection options, applied to every step's client (each optional):
//   flightUrl          "127.0.0.1:PORT" (host:port, as the SDK takes it; no scheme)
//   httpUrl            "http://127.0.0.1:PORT" or "https://127.0.0.1:PORT"
//   flightTlsEnabled   true for a TLS Flight endpoint (the SDK turns TLS off for 127.0.0.1/localhost by default)
//   tlsRootCertFile    PEM CA the SDK's gRPC channel verifies the server with (HTTPS ignores it: see below)
//   tlsClientCertFile, tlsClientKeyFile   PEM client certificate and key for mTLS (gRPC only, see below)
//   apiKey             sent as `authorization: Bearer <key>` over Flight (TLS channels only: the SDK's
//                      plaintext channel sends no call metadata), `X-API-Key` over HTTP
//   maxRetries         passed to client.setMaxRetries() (the SDK's default is 3, with backoff from 1 s)
//   timeoutMs          the whole job's deadline (default 30000): past it, the script reports and exits 1
//   logging            the SDK's own logging (default false; it goes to stderr)
// The work:
//   steps              [{"call": ..., ...}, ...], run in order, every step on a NEW SpiceClient:
//     {"call": "sql", "query": "...", "parameters"?: [...] | {...}}
//                      `sql(query, {parameters})` with flightOnly (Arrow Flight, no fallback to HTTP).
//                      With parameters the SDK runs a Flight SQL prepared statement
//                      (CreatePreparedStatement, DoPut of a one-row batch with columns `$1`, `$2`… for a
//                      list or the bare names for an object, GetFlightInfo, DoGet, ClosePreparedStatement).
//                      A parameter is a plain JSON value (the SDK infers its Arrow type: integers Int64,
//                      other numbers Float64, strings Utf8) or the SDK's Param shape {"value": 2, "type": "Int32"}.
//     {"call": "sqlHttp", "query": "...", "parameters"?: ...}
//                      the same `sql()` with httpOnly: POST /v1/sql, Accept: application/json (with
//                      parameters a JSON body {"sql", "parameters"}), an Arrow table rebuilt from the rows
//     {"call": "sqlJson", "query": "..."}
//                      `sqlJson()` with httpOnly (Accept: application/vnd.spiceai.sql.v1+json, rows read
//                      from the answer's `data`)
//     {"call": "refresh", "dataset": "trips", "options"?: {...}}
//                      `refreshAcceleration(dataset, options)`; its JSON answer as `answer`
//     {"call": "listActive", "sqlPreview"?: "...", "waitMs"?: 20000}
//                      `listActiveQueries()`: without sqlPreview, the list once as `queries`; with it, polled
//                      (every 100 ms, up to waitMs) until a query with that sql_preview shows, as `listed`
//     {"call": "cancelActive", "queryId": "..."}  or  {"call": "cancelActive", "sqlPreview": "...", "waitMs"?: ...}
//                      `cancelActiveQuery(queryId)` as `cancelled`; given sqlPreview instead, the same
//                      client first polls listActiveQueries() for it (as listActive) and cancels its
//                      query_id (both `listed` and `cancelled` in the result)
//     Any step may say "continueOnError": true: its failure is recorded and the job goes on.
//   repeat             how many rounds of the steps (default 1)
//
// What the SDK does with its connections (read from dist/node of 3.2.0): SpiceClient has no close()
// method. Every sql() builds a new @grpc/grpc-js client (its own channel) inside
// GrpcFlightClient.executeQuery and never closes it; grpc-js leaves the idle channel's HTTP/2 session
// unref'd, so the process ends without closing it (no TLS close_notify, the kernel closes the socket).
// HTTP goes through node-fetch with one module-wide `https.Agent({keepAlive: true})` that ignores
// tlsRootCertFile and the client certificate options: HTTPS to a private CA needs NODE_EXTRA_CA_CERTS
// (run_sdk sets it from tlsRootCertFile), and the SDK cannot present a client certificate over HTTP
// at all. This script adds no close of its own: each step's client is dropped, as an application
// using the SDK would drop it, and when every step succeeded the process ends on its own.
//
// Prints exactly one JSON line on stdout:
//   {"ok": true, "results": [{"step": 0, "round": 0, "call": "sql", "query": "...", "rows": [{...}], "ms": 12}, ...]}
//   {"ok": false, "error": "...", "code": 14, "details": "...", "step": 0, "round": 0, "call": "sql", "query": "...",
//    "results": [...]}
// A result carries what its call returned (`rows` and for sqlJson `row_count`; `answer`; `queries`;
// `listed`; `cancelled`) or, for a failed step, `error` (the error's message), `code` and `details`
// (a gRPC status code and text; null for HTTP). The first failure not marked continueOnError ends the
// job: its reason is the top-level `error` ("<call>(...) failed: <message>"), with `code` and `details`.
// When steps marked continueOnError failed but every other step succeeded, ok is false and `error`
// names the first of them. The exit code is 0 when every step succeeded, 1 otherwise (the reason also
// goes to stderr).

import { readFileSync } from 'node:fs';

// The SDK logs through console.*; stdout carries only the one result line.
for (const name of ['log', 'info', 'debug', 'warn']) {
  console[name] = (...args) => process.stderr.write(args.map(String).join(' ') + '\n');
}

const CONNECTION = ['apiKey', 'flightUrl', 'httpUrl', 'flightTlsEnabled', 'tlsRootCertFile', 'tlsClientCertFile',
  'tlsClientKeyFile'];
const CALLS = ['sql', 'sqlHttp', 'sqlJson', 'refresh', 'listActive', 'cancelActive'];
const ECHOED = ['query', 'parameters', 'dataset', 'queryId', 'sqlPreview']; // step keys copied into its result
const POLL_MS = 100;

const results = [];
let current = {};
let finished = false;

function jsonSafe(value) {
  if (typeof value === 'bigint') {
    return Number.isSafeInteger(Number(value)) ? Number(value) : value.toString();
  }
  if (value instanceof Uint8Array) return Buffer.from(value).toString('base64');
  if (value instanceof Date) return value.toISOString();
  if (Array.isArray(value)) return value.map(jsonSafe);
  if (value && typeof value === 'object') {
    if (typeof value.toJSON === 'function' && value.constructor !== Object) {
      return jsonSafe(value.toJSON());
    }
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, jsonSafe(v)]));
  }
  return value;
}

function messageOf(err) {
  return err instanceof Error ? err.message : String(err);
}

function finish(payload, code) {
  if (finished) return;
  finished = true;
  process.stdout.write(JSON.stringify(payload) + '\n', () => process.exit(code));
}

function fail(reason, err) {
  process.stderr.write(`sdk_client: ${reason}: ${err instanceof Error && err.stack ? err.stack : messageOf(err)}\n`);
  if (finished) {
    process.exitCode = 1; // the result line is out already; the exit code still tells
    return;
  }
  finish({ ok: false, error: `${reason}: ${messageOf(err)}`, code: err?.code ?? null, details: err?.details ?? null,
           ...current, results }, 1);
}

process.on('uncaughtException', (err) => fail('uncaught exception', err));
process.on('unhandledRejection', (err) => fail('unhandled rejection', err));

function readJob() {
  const text = process.argv[2] ?? readFileSync(0, 'utf8');
  let job;
  try {
    job = JSON.parse(text);
  } catch (err) {
    throw new Error(`the job is not JSON: ${err.message}`);
  }
  if (!Array.isArray(job.steps) || job.steps.length === 0) {
    throw new Error('the job needs "steps": [{"call": ...}, ...]');
  }
  for (const [i, step] of job.steps.entries()) {
    if (!CALLS.includes(step?.call)) {
      throw new Error(`step ${i}: unknown call ${JSON.stringify(step?.call)} (expected one of ${CALLS.join(', ')})`);
    }
  }
  return job;
}

function newClient(SpiceClient, job, call) {
  const config = {
    logging: job.logging ?? false,
    flightOnly: call === 'sql',
    httpOnly: call !== 'sql',
  };
  for (const key of CONNECTION) {
    if (job[key] !== undefined && job[key] !== null) config[key] = job[key];
  }
  const client = new SpiceClient(config);
  if (job.maxRetries !== undefined && job.maxRetries !== null) client.setMaxRetries(job.maxRetries);
  return client;
}

function rowsOf(table) {
  return jsonSafe(table.toArray().map((row) => (typeof row?.toJSON === 'function' ? row.toJSON() : row)));
}

async function waitListed(client, sqlPreview, waitMs) {
  for (const deadline = Date.now() + waitMs; ;) {
    const listed = (await client.listActiveQueries()).find((q) => q.sql_preview === sqlPreview);
    if (listed) return listed;
    if (Date.now() >= deadline) {
      throw new Error(`no active query with sql_preview ${JSON.stringify(sqlPreview)} within ${waitMs} ms`);
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function runStep(SpiceClient, job, step) {
  const client = newClient(SpiceClient, job, step.call);
  const waitMs = step.waitMs ?? 20000;
  switch (step.call) {
    case 'sql':
    case 'sqlHttp': {
      const options = step.parameters === undefined ? undefined : { parameters: step.parameters };
      return { rows: rowsOf(await client.sql(step.query, options)) };
    }
    case 'sqlJson': {
      if (step.parameters !== undefined) throw new Error('sqlJson() takes no parameters');
      const answer = await client.sqlJson(step.query);
      return { rows: jsonSafe(answer.data), row_count: answer.row_count };
    }
    case 'refresh':
      return { answer: jsonSafe(await client.refreshAcceleration(step.dataset, step.options)) };
    case 'listActive':
      if (step.sqlPreview === undefined) return { queries: jsonSafe(await client.listActiveQueries()) };
      return { listed: jsonSafe(await waitListed(client, step.sqlPreview, waitMs)) };
    case 'cancelActive': {
      if (step.queryId !== undefined) return { cancelled: jsonSafe(await client.cancelActiveQuery(step.queryId)) };
      if (step.sqlPreview === undefined) throw new Error('cancelActive needs "queryId" or "sqlPreview"');
      const listed = await waitListed(client, step.sqlPreview, waitMs);
      return { listed: jsonSafe(listed), cancelled: jsonSafe(await client.cancelActiveQuery(listed.query_id)) };
    }
    default:
      throw new Error(`unknown call ${JSON.stringify(step.call)}`);
  }
}

function describe(step) {
  const what = step.query ?? step.dataset ?? step.queryId ?? step.sqlPreview;
  return `${step.call}(${what === undefined ? '' : JSON.stringify(what)})`;
}

async function main() {
  const job = readJob();
  const timeoutMs = job.timeoutMs ?? 30000;
  const timer = setTimeout(() => fail(`no answer within ${timeoutMs} ms`, new Error('timed out')), timeoutMs);
  timer.unref();
  const { SpiceClient } = await import('@spiceai/spice');
  let firstTolerated = null;
  for (let round = 0; round < (job.repeat ?? 1); round++) {
    for (const [index, step] of job.steps.entries()) {
      current = { step: index, round, call: step.call };
      for (const key of ECHOED) if (step[key] !== undefined) current[key] = step[key];
      const started = Date.now();
      try {
        const answer = await runStep(SpiceClient, job, step);
        results.push({ ...current, ...answer, ms: Date.now() - started });
      } catch (err) {
        if (!step.continueOnError) throw Object.assign(err instanceof Error ? err : new Error(String(err)),
          { sdkStep: describe(step) });
        results.push({ ...current, error: messageOf(err), code: err?.code ?? null, details: err?.details ?? null,
                       ms: Date.now() - started });
        firstTolerated ??= { reason: `${describe(step)} failed`, err, at: current };
      }
    }
  }
  clearTimeout(timer);
  if (firstTolerated) {
    current = firstTolerated.at;
    fail(firstTolerated.reason, firstTolerated.err);
    return;
  }
  current = {};
  // Leave the SDK's channels as the SDK leaves them: the process ends once nothing holds the loop.
  process.stdout.write(JSON.stringify({ ok: true, results }) + '\n');
  finished = true;
}

main().catch((err) => fail(err?.sdkStep ? `${err.sdkStep} failed` : 'job failed', err));
