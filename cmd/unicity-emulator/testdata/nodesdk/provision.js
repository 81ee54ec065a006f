'use strict';
// Provisions a device through the emulator's DPS with Microsoft's Node.js device SDKs, then
// connects to the assigned hub, sends one telemetry message, updates the reported twin and
// serves the cloud: it completes one cloud-to-device message, answers the direct method
// "reboot" and takes a desired-property patch carrying "marker", then closes.
//
// TLS trust comes from NODE_EXTRA_CA_CERTS (the emulator's trust bundle); verification stays
// on. The SDKs take a host, not a port: both build "mqtts://" + host, so "localhost:PORT"
// reaches the emulator's port, and the hub username carries the same host:port that DPS
// assigned.
//
// Every step is reported as one JSON line on stdout, {"event": NAME, ...}: "ready" (after
// telemetry and the twin update, with the assignment), "c2d", "method", "desired", "done".
// Any failure, or 60 s without all three cloud operations, exits 1.
//
// Environment: DPS_HOST (host:port), ID_SCOPE, REGISTRATION_ID, CERT_FILE (leaf + chain,
// PEM), KEY_FILE (PEM).

const fs = require('fs');
const { X509Security } = require('azure-iot-security-x509');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const ProvisioningMqtt = require('azure-iot-provisioning-device-mqtt').Mqtt;
const { Client, Message } = require('azure-iot-device');
const HubMqtt = require('azure-iot-device-mqtt').Mqtt;

function env(name) {
  const v = process.env[name];
  if (!v) {
    throw new Error(`${name} is not set`);
  }
  return v;
}

function report(event, fields) {
  console.log(JSON.stringify({ event, ...fields }));
}

async function main() {
  const registrationId = env('REGISTRATION_ID');
  const cert = fs.readFileSync(env('CERT_FILE'), 'utf8');
  const key = fs.readFileSync(env('KEY_FILE'), 'utf8');

  const security = new X509Security(registrationId, { cert, key });
  const provisioning = ProvisioningDeviceClient.create(env('DPS_HOST'), env('ID_SCOPE'), new ProvisioningMqtt(), security);
  const result = await provisioning.register();

  const client = Client.fromConnectionString(`HostName=${result.assignedHub};DeviceId=${result.deviceId};x509=true`, HubMqtt);
  client.setOptions({ cert, key });
  await client.open();
  try {
    const pending = new Set(['c2d', 'method', 'desired']);
    let finished;
    const allDone = new Promise((resolve) => { finished = resolve; });
    const done = (what, fields) => {
      if (pending.delete(what)) {
        report(what, fields);
      }
      if (pending.size === 0) {
        finished();
      }
    };

    client.on('message', (msg) => {
      client.complete(msg, (err) => {
        if (err) {
          throw err;
        }
        const props = {};
        for (const p of msg.properties.propertyList) {
          props[p.key] = p.value;
        }
        done('c2d', { payload: msg.data.toString(), messageId: msg.messageId, properties: props });
      });
    });
    client.onDeviceMethod('reboot', (request, response) => {
      response.send(200, { rebooting: true, request: request.payload }, (err) => {
        if (err) {
          throw err;
        }
        done('method', { payload: request.payload });
      });
    });

    const message = new Message(JSON.stringify({ temperature: 21.5 }));
    message.contentType = 'application/json';
    message.contentEncoding = 'utf-8';
    message.messageId = 'node-1';
    message.properties.add('source', 'node sdk');
    await client.sendEvent(message);

    const twin = await client.getTwin();
    await new Promise((resolve, reject) => {
      twin.properties.reported.update({ sdk: 'azure-iot-device', firmware: { version: '1.0.0' } }, (err) => (err ? reject(err) : resolve()));
    });
    twin.on('properties.desired', (patch) => {
      if (patch.marker !== undefined) {
        done('desired', { marker: patch.marker, version: patch.$version });
      }
    });

    report('ready', { assignedHub: result.assignedHub, deviceId: result.deviceId, substatus: result.substatus });
    const timeout = setTimeout(() => {
      console.error(`still waiting for ${[...pending].join(', ')}`);
      process.exit(1);
    }, 60000);
    await allDone;
    clearTimeout(timeout);
  } finally {
    await client.close();
  }
  report('done', {});
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
