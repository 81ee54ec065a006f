'use strict';
// What the scripts here share: the environment they are given, their one-line JSON reports,
// and a device provisioned by X.509 through the emulator's DPS and connected to the hub it
// was assigned, with Microsoft's Node.js device SDKs.
//
// TLS trust comes from NODE_EXTRA_CA_CERTS (the emulator's trust bundle); verification stays
// on. The SDKs take a host, not a port: both build "mqtts://" + host, so a DPS at
// "localhost:PORT" is reached on its port, and a hub is dialled by the name DPS assigned.
//
// Environment: DPS_HOST (host:port), ID_SCOPE, REGISTRATION_ID, CERT_FILE (leaf + chain,
// PEM), KEY_FILE (PEM).

const fs = require('fs');
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

// report prints one event as a JSON line on stdout.
function report(event, fields) {
  console.log(JSON.stringify({ event, ...fields }));
}

// connect registers with DPS and opens the hub connection; it returns the client and the
// registration result.
async function connect() {
  const registrationId = env('REGISTRATION_ID');
  const cert = fs.readFileSync(env('CERT_FILE'), 'utf8');
  const key = fs.readFileSync(env('KEY_FILE'), 'utf8');
  const security = new X509Security(registrationId, { cert, key });
  const provisioning = ProvisioningDeviceClient.create(env('DPS_HOST'), env('ID_SCOPE'), new ProvisioningMqtt(), security);
  const result = await provisioning.register();
  const client = Client.fromConnectionString(`HostName=${result.assignedHub};DeviceId=${result.deviceId};x509=true`, HubMqtt);
  client.setOptions({ cert, key });
  await client.open();
  return { client, result };
}

// updateReported patches the reported properties of twin.
function updateReported(twin, patch) {
  return new Promise((resolve, reject) => {
    twin.properties.reported.update(patch, (err) => (err ? reject(err) : resolve()));
  });
}

// run runs main, and ends the process with 1 on any failure.
function run(main) {
  main().catch((err) => {
    console.error(err && err.stack ? err.stack : err);
    process.exit(1);
  });
}

module.exports = { env, report, connect, updateReported, run };
