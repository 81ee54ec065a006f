'use strict';
// Provisions a device through the emulator's DPS with Microsoft's Node.js device SDKs, then
// connects to the assigned hub, sends one telemetry message, updates the reported twin and
// serves the cloud: it completes one cloud-to-device message, answers the direct method
// "reboot" and takes a desired-property patch carrying "marker", then closes.
//
// Every step is reported as one JSON line on stdout, {"event": NAME, ...}: "ready" (after
// telemetry and the twin update, with the assignment), "c2d", "method", "desired", "done".
// Any failure, or 60 s without all three cloud operations, exits 1.
//
// Environment: as common.js says.

const { Message } = require('azure-iot-device');
const { report, connect, updateReported, run } = require('./common');

async function main() {
  const { client, result } = await connect();
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
    await updateReported(twin, { sdk: 'azure-iot-device', firmware: { version: '1.0.0' } });
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

run(main);
