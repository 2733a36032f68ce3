#!/usr/bin/env node
// The official Spice.ai JavaScript SDK (@spiceai/spice, pinned in package.json) as a test client.
//
//   node tests/js/sdk_client.mjs '<job JSON>'      or      echo '<job JSON>' | node tests/js/sdk_client.mjs
//
// The job (every key optional except the URLs the chosen calls need):
//   flightUrl          "127.0.0.1:PORT" (host:port, as the SDK takes it; no scheme)
//   httpUrl            "https://127.0.0.1:PORT"
//   flightTlsEnabled   true for a TLS Flight endpoint (the SDK turns TLS off for 127.0.0.1/localhost by default)
//   tlsRootCertFile    PEM CA the SDK's gRPC channel verifies the server with
//   tlsClientCertFile, tlsClientKeyFile   PEM client certificate and key for mTLS (gRPC only, see below)
//   apiKey             sent as `authorization: Bearer <key>` over Flight, `X-API-Key` over HTTP
//   queries            ["SELECT 1 AS one", ...]
//   repeat             how many rounds (default 1); every round builds a NEW SpiceClient
//   calls              any of "sql": `sql()` with flightOnly (Arrow Flight, no fallback to HTTP);
//                      "sqlHttp": `sql()` with httpOnly (POST /v1/sql, Accept: application/json);
//                      "sqlJson": `sqlJson()` with httpOnly (POST /v1/sql, Accept: application/vnd.spiceai.sql.v1+json,
//                      rows read from the answer's `data`)
//   maxRetries         passed to client.setMaxRetries() (the SDK's default is 3, with backoff from 1 s)
//   timeoutMs          the whole job's deadline (default 30000): past it, the script reports and exits 1
//
// What the SDK does with its connections (read from dist/node of 3.2.0): SpiceClient has no close()
// method. Every sql() builds a new @grpc/grpc-js client (its own channel) inside
// GrpcFlightClient.executeQuery and never closes it; grpc-js leaves the idle channel's HTTP/2 session
// unref'd, so the process ends without closing it (no TLS close_notify, the kernel closes the socket).
// HTTP goes through node-fetch with one module-wide `https.Agent({keepAlive: true})` that ignores
// tlsRootCertFile and the client certificate options: HTTPS to a private CA needs NODE_EXTRA_CA_CERTS,
// and the SDK cannot present a client certificate over HTTP at all. This script adds no close of its
// own: each round's client is dropped, as an application using the SDK would drop it.
//
// Prints exactly one JSON line on stdout:
//   {"ok": true, "results": [{"round": 0, "call": "sql", "query": "...", "rows": [{...}], "ms": 12}, ...]}
//   {"ok": false, "error": "...", "code": 14, "round": 0, "call": "sql", "query": "...", "results": [...]}
// and exits 0 when every call succeeded, 1 otherwise (the reason also goes to stderr).

import { readFileSync } from 'node:fs';

// The SDK logs through console.*; stdout carries only the one result line.
for (const name of ['log', 'info', 'debug', 'warn']) {
  console[name] = (...args) => process.stderr.write(args.map(String).join(' ') + '\n');
}

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

function finish(payload, code) {
  if (finished) return;
  finished = true;
  process.stdout.write(JSON.stringify(payload) + '\n', () => process.exit(code));
}

function fail(reason, err) {
  const message = err instanceof Error ? err.message : String(err);
  process.stderr.write(`sdk_client: ${reason}: ${err instanceof Error && err.stack ? err.stack : message}\n`);
  if (finished) {
    process.exitCode = 1; // the result line is out already; the exit code still tells
    return;
  }
  finish({ ok: false, error: `${reason}: ${message}`, code: err?.code ?? null, details: err?.details ?? null,
           ...current, results }, 1);
}

process.on('uncaughtException', (err) => fail('uncaught exception', err));
process.on('unhandledRejection', (err) => fail('unhandled rejection', err));

function readJob() {
  const text = process.argv[2] ?? readFileSync(0, 'utf8');
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(`the job is not JSON: ${err.message}`);
  }
}

function newClient(job, call) {
  const config = {
    logging: job.logging ?? false,
    flightOnly: call === 'sql',
    httpOnly: call === 'sqlHttp' || call === 'sqlJson',
  };
  for (const key of ['apiKey', 'flightUrl', 'httpUrl', 'flightTlsEnabled', 'tlsRootCertFile', 'tlsClientCertFile',
    'tlsClientKeyFile']) {
    if (job[key] !== undefined && job[key] !== null) config[key] = job[key];
  }
  return config;
}

async function runCall(SpiceClient, job, call, query) {
  const client = new SpiceClient(newClient(job, call));
  if (job.maxRetries !== undefined) client.setMaxRetries(job.maxRetries);
  if (call === 'sql' || call === 'sqlHttp') {
    const table = await client.sql(query);
    return { rows: jsonSafe(table.toArray().map((row) => (typeof row.toJSON === 'function' ? row.toJSON() : row))) };
  }
  if (call === 'sqlJson') {
    const answer = await client.sqlJson(query);
    return { rows: jsonSafe(answer.data), row_count: answer.row_count };
  }
  throw new Error(`unknown call ${JSON.stringify(call)} (expected "sql", "sqlHttp" or "sqlJson")`);
}

async function main() {
  const job = readJob();
  const timeoutMs = job.timeoutMs ?? 30000;
  const timer = setTimeout(() => fail(`no answer within ${timeoutMs} ms`, new Error('timed out')), timeoutMs);
  timer.unref();
  const { SpiceClient } = await import('@spiceai/spice');
  const calls = job.calls ?? ['sql'];
  const queries = job.queries ?? ['SELECT 1 AS one'];
  for (let round = 0; round < (job.repeat ?? 1); round++) {
    for (const call of calls) {
      for (const query of queries) {
        current = { round, call, query };
        const started = Date.now();
        const answer = await runCall(SpiceClient, job, call, query);
        results.push({ ...current, ...answer, ms: Date.now() - started });
      }
    }
  }
  current = {};
  clearTimeout(timer);
  // Leave the SDK's channels as the SDK leaves them: the process ends once nothing holds the loop.
  process.stdout.write(JSON.stringify({ ok: true, results }) + '\n');
  finished = true;
}

main().catch((err) => fail(current.call ? `${current.call}(${JSON.stringify(current.query)}) failed` : 'job failed', err));
