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
// Environment: DPS_HOST (host:port), ID_SCOPE, REGISTRATION_ID, CERT_FILE (leaf + chain,
// PEM), KEY_FILE (PEM). TLS trust comes from NODE_EXTRA_CA_CERTS; verification stays on.

const fs = require('fs');
const readline = require('readline');
const { X509Security } = require('azure-iot-security-x509');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const ProvisioningMqtt = require('azure-iot-provisioning-device-mqtt').Mqtt;
const { Client } = require('azure-iot-device');
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

function updateReported(twin, patch) {
  return new Promise((resolve, reject) => {
    twin.properties.reported.update(patch, (err) => (err ? reject(err) : resolve()));
  });
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

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
