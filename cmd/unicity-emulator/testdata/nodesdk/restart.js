'use strict';
// Rides out an emulator restart with Microsoft's Node.js device SDKs: provisions through DPS,
// connects to the assigned hub (CleanSession 0, as the SDK does), serves the direct method
// "ping" (which also makes the SDK reconnect on its own after the connection drops) and
// reports {"phase":"before"}; then follows commands on stdin, one per line:
//   listen  start taking cloud-to-device messages (until now none were subscribed to)
//   twin    read the twin, report {"phase":"after"}, and say both reported versions
//   done    close and exit
// Each step is reported as one JSON line on stdout, {"event": NAME, ...}: "ready" (with the
// assignment), "c2d", "twin", "done". Any failure exits 1.
//
// Environment: as common.js says.

const readline = require('readline');
const { report, connect, updateReported, run } = require('./common');

async function main() {
  const { client, result } = await connect();
  client.onDeviceMethod('ping', (request, response) => {
    response.send(200, { pong: true }, (err) => {
      if (err) {
        console.error(`method response: ${err}`);
      }
    });
  });
  const twin = await client.getTwin();
  await updateReported(twin, { phase: 'before' });
  report('ready', { assignedHub: result.assignedHub, deviceId: result.deviceId });

  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    switch (line.trim()) {
      case 'listen':
        client.on('message', (msg) => {
          client.complete(msg, (err) => {
            if (err) {
              console.error(`complete: ${err}`);
              process.exit(1);
            }
            report('c2d', { payload: msg.data.toString(), messageId: msg.messageId });
          });
        });
        break;
      case 'twin': {
        const before = (await client.getTwin()).properties.reported.$version;
        const now = await client.getTwin();
        await updateReported(now, { phase: 'after' });
        const after = (await client.getTwin()).properties.reported.$version;
        report('twin', { reportedVersion: before, afterUpdate: after });
        break;
      }
      case 'done':
        await client.close();
        report('done', {});
        process.exit(0);
        break;
      default:
        throw new Error(`unknown command ${JSON.stringify(line)}`);
    }
  }
}

run(main);
