'use strict';
// Provisions a device through the emulator's DPS with Microsoft's Node.js SDK and its HTTP
// transport (azure-iot-provisioning-device-http): DPS's REST API over HTTPS, with an X.509
// certificate or a symmetric key. It reports the assignment, {"event":"registered",...}, and
// exits 0; any failure exits 1 with the error (and DPS's status and body) on stderr.
//
// The SDK's HTTP transport takes a host name only and connects to 443; an https.Agent handed
// to it through its own http.agent option (azure-iot-http-base) supplies DPS_PORT.
//
// Environment: DPS_HOST (a name the emulator's certificate covers), DPS_PORT, ID_SCOPE,
// REGISTRATION_ID, and CERT_FILE (leaf + chain, PEM) with KEY_FILE (PEM), or SYMMETRIC_KEY
// (base64). TLS trust as in common.js.

const fs = require('fs');
const https = require('https');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const ProvisioningHttp = require('azure-iot-provisioning-device-http').Http;
const { X509Security } = require('azure-iot-security-x509');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
// The http-base the transport itself depends on, whatever version sits at the top level.
const { Http: HttpBase } = require(require.resolve('azure-iot-http-base', {
  paths: [require.resolve('azure-iot-provisioning-device-http')],
}));
const { env, report, run } = require('./common');

run(async () => {
  const registrationId = env('REGISTRATION_ID');
  let security;
  if (process.env.SYMMETRIC_KEY) {
    security = new SymmetricKeySecurityClient(registrationId, process.env.SYMMETRIC_KEY);
  } else {
    security = new X509Security(registrationId, {
      cert: fs.readFileSync(env('CERT_FILE'), 'utf8'),
      key: fs.readFileSync(env('KEY_FILE'), 'utf8'),
    });
  }

  const agent = new https.Agent();
  agent.defaultPort = Number(env('DPS_PORT'));
  const httpBase = new HttpBase();
  httpBase.setOptions({ http: { agent } });

  const provisioning = ProvisioningDeviceClient.create(env('DPS_HOST'), env('ID_SCOPE'), new ProvisioningHttp(httpBase), security);
  let result;
  try {
    result = await provisioning.register();
  } catch (err) {
    if (err && err.response) {
      console.error(`status ${err.response.statusCode}: ${err.responseBody}`);
    }
    throw err;
  } finally {
    agent.destroy();
  }
  report('registered', {
    assignedHub: result.assignedHub,
    deviceId: result.deviceId,
    registrationId: result.registrationId,
    status: result.status,
    substatus: result.substatus,
  });
});
