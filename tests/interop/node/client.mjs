// MQTT.js driver for jitp's interop tests (tests/interop/clients.py, class MqttJs).
//
// Runs one job on one connection and prints one JSON line with what the client saw:
//   node client.mjs '<job as JSON>'
// The job: {port, ca, cert, key, clientId, version (4 or 5), clean, sessionExpiry (or null),
// deadlineMs, steps: [{subscribe: filter, qos} | {publish: topic, payload, qos, retain} | {ready: true}
// | {expect: n}]}; a ready step prints the line {"ready":true}.
// The answer: {connack, sessionPresent, reason, protocol, granted, messages: [{topic, payload, retain}],
// error}. Every step waits for the broker's acknowledgement (SUBACK, PUBACK) or for the messages.
import { readFileSync } from "node:fs";
import mqtt from "mqtt";

const job = JSON.parse(process.argv[2]);
const out = {
  connack: null,
  sessionPresent: null,
  reason: "",
  protocol: job.version,
  granted: [],
  messages: [],
  error: null,
};

function finish(code) {
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(code);
}

const timer = setTimeout(() => {
  out.error = out.error ?? `deadline of ${job.deadlineMs} ms passed`;
  finish(0);
}, job.deadlineMs);

const options = {
  protocolVersion: job.version,
  clientId: job.clientId,
  clean: job.clean,
  ca: readFileSync(job.ca),
  cert: readFileSync(job.cert),
  key: readFileSync(job.key),
  rejectUnauthorized: true,
  reconnectPeriod: 0,
  connectTimeout: job.deadlineMs,
  keepalive: 30,
};
if (job.version === 5 && job.sessionExpiry !== null) {
  options.properties = { sessionExpiryInterval: job.sessionExpiry };
}

const client = mqtt.connect(`mqtts://127.0.0.1:${job.port}`, options);
let waiting = null; // {count, resolve}: an expect step in progress

client.on("message", (topic, payload, packet) => {
  out.messages.push({ topic, payload: payload.toString("utf8"), retain: Boolean(packet.retain) });
  if (waiting && out.messages.length >= waiting.count) waiting.resolve();
});

let reasonString = null; // MQTT 5: the CONNACK's Reason String, which MQTT.js keeps on the packet
client.on("packetreceive", (packet) => {
  if (packet.cmd === "connack") reasonString = packet.properties?.reasonString ?? null;
});

client.on("error", (err) => {
  // A refused CONNACK: MQTT.js reports it as an error with the return or reason code.
  if (typeof err.code === "number") out.connack = err.code;
  out.reason = reasonString ? `${err.message} (${reasonString})` : err.message;
  out.error = err.message;
  clearTimeout(timer);
  client.end(true, () => finish(0));
});

client.once("connect", async (connack) => {
  out.connack = connack.returnCode ?? connack.reasonCode ?? 0;
  out.sessionPresent = Boolean(connack.sessionPresent);
  try {
    for (const step of job.steps) await run(step);
  } catch (err) {
    out.error = String(err?.message ?? err);
  }
  clearTimeout(timer);
  client.end(false, () => finish(0));
});

function run(step) {
  if ("subscribe" in step) {
    return client.subscribeAsync(step.subscribe, { qos: step.qos }).then(
      (granted) => {
        for (const g of granted) out.granted.push(g.qos);
      },
      (err) => {
        // A refused subscription: MQTT.js rejects, with the SUBACK packet on the error.
        if (!Array.isArray(err.packet?.granted)) throw err;
        out.granted.push(...err.packet.granted);
      },
    );
  }
  if ("publish" in step) {
    return client.publishAsync(step.publish, step.payload, { qos: step.qos, retain: step.retain });
  }
  if ("ready" in step) {
    process.stdout.write('{"ready":true}\n'); // the steps before are done (pipes are written at once)
    return Promise.resolve();
  }
  if ("expect" in step) {
    if (out.messages.length >= step.expect) return Promise.resolve();
    return new Promise((resolve) => {
      waiting = { count: step.expect, resolve };
    });
  }
  return Promise.reject(new Error(`unknown step ${JSON.stringify(step)}`));
}
