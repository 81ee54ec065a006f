'use strict';
// Provisions a device through the emulator's DPS with Microsoft's Node.js device SDKs, then
// connects to the assigned hub, sends one telemetry message and updates the reported twin.
// TLS trust comes from NODE_EXTRA_CA_CERTS (the emulator's trust bundle); verification stays
// on. The SDKs take a host, not a port: both build "mqtts://" + host, so "localhost:PORT"
// reaches the emulator's port, and the hub username carries the same host:port that DPS
// assigned. Prints one JSON line with the assignment; any failure exits 1.
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
  } finally {
    await client.close();
  }
  console.log(JSON.stringify({ assignedHub: result.assignedHub, deviceId: result.deviceId, substatus: result.substatus }));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});
