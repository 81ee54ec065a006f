package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

// TestCustomAllocation: an enrollment's custom allocation hook, a static reply or a program
// given Azure's AllocationRequest, chooses the hub, sets the initial twin and returns a
// payload in registrationState.payload; a failing hook fails the registration as DPS does.
func TestCustomAllocation(t *testing.T) {
	dir := initDir(t)
	s := serve(t, dir, "--hubs", "2")

	t.Run("static reply", func(t *testing.T) {
		dev := newDevice(t, dir, "alloc-static")
		var out map[string]any
		cliJSON(t, &out, "enroll", "--dir", dir, "--registration-id", dev.id, "--cert", dev.chainFile, "--allocation-reply",
			`{"iotHubHostName":"`+s.Hubs[1]+`","payload":{"site":"lab"},"initialTwin":{"properties":{"desired":{"mode":"eco"}}}}`)
		r := registerWith(t, s, dev, `{"registrationId":"`+dev.id+`","payload":{"model":"gw"}}`)
		require.Equal(t, "assigned", r.Status, "%+v", r)
		assert.Equal(t, s.Hubs[1], r.RegistrationState.AssignedHub)
		assert.JSONEq(t, `{"site":"lab"}`, string(r.RegistrationState.Payload))
		var twin map[string]map[string]any
		cliJSON(t, &twin, "twin", "--dir", dir, "--device", dev.id)
		assert.Equal(t, "eco", twin["desired"]["mode"])
	})

	t.Run("script", func(t *testing.T) {
		dev := newDevice(t, dir, "alloc-script")
		script := filepath.Join(t.TempDir(), "allocate.sh")
		request := script + ".request"
		require.NoError(t, os.WriteFile(script, []byte("#!/bin/sh\ncat > '"+request+"'\n"+
			`printf '{"iotHubHostName":"`+s.Hubs[0]+`","payload":{"from":"script"}}'`+"\n"), 0o755))
		var out map[string]any
		cliJSON(t, &out, "enroll", "--dir", dir, "--registration-id", dev.id, "--cert", dev.chainFile, "--allocation-script", script)
		r := registerWith(t, s, dev, `{"registrationId":"`+dev.id+`","payload":{"model":"gw"}}`)
		require.Equal(t, "assigned", r.Status, "%+v", r)
		assert.Equal(t, s.Hubs[0], r.RegistrationState.AssignedHub)
		assert.JSONEq(t, `{"from":"script"}`, string(r.RegistrationState.Payload))
		sent, err := os.ReadFile(request)
		require.NoError(t, err)
		hubs, _ := json.Marshal(s.Hubs)
		assert.JSONEq(t, `{"individualEnrollment":{"registrationId":"alloc-script"},
			"deviceRuntimeContext":{"registrationId":"alloc-script","x509":{},"payload":{"model":"gw"}},
			"linkedHubs":`+string(hubs)+`}`, string(sent), "Azure's AllocationRequest")

		// Registering again tells the hook where the device is.
		registerWith(t, s, dev, `{"registrationId":"`+dev.id+`"}`)
		sent, err = os.ReadFile(request)
		require.NoError(t, err)
		var again allocationRequest
		require.NoError(t, json.Unmarshal(sent, &again))
		assert.Equal(t, s.Hubs[0], again.DeviceRuntimeContext.CurrentIoTHubHostName)
		assert.Equal(t, dev.id, again.DeviceRuntimeContext.CurrentDeviceID)
	})

	t.Run("failing script", func(t *testing.T) {
		dev := newDevice(t, dir, "alloc-fails")
		script := filepath.Join(t.TempDir(), "allocate.sh")
		require.NoError(t, os.WriteFile(script, []byte("#!/bin/sh\necho 'no site for this device' >&2\nexit 3\n"), 0o755))
		var out map[string]any
		cliJSON(t, &out, "enroll", "--dir", dir, "--registration-id", dev.id, "--cert", dev.chainFile, "--allocation-script", script)
		r := registerWith(t, s, dev, `{"registrationId":"`+dev.id+`"}`)
		assert.Equal(t, "failed", r.Status)
		assert.Equal(t, 400207, r.RegistrationState.ErrorCode)
		var regs registrationsJSON
		cliJSON(t, &regs, "registrations", "--dir", dir, "--device", dev.id)
		require.Equal(t, 1, regs.Count)
		assert.Equal(t, dpstest.OutcomeFailed, regs.Registrations[0].Outcome)
		assert.Contains(t, regs.Registrations[0].Reason, "no site for this device")
	})

	t.Run("refused hooks", func(t *testing.T) {
		_, code := runCLI(t, "enroll", "--dir", dir, "--registration-id", "x", "--thumbprint", "AB", "--allocation-reply", `{"payload":{}}`)
		assert.Equal(t, 1, code, "a reply names its hub")
		_, code = runCLI(t, "enroll", "--dir", dir, "--registration-id", "x", "--thumbprint", "AB", "--allocation-script", "/nonexistent")
		assert.Equal(t, 1, code)
		_, code = runCLI(t, "enroll", "--dir", dir, "--registration-id", "x", "--thumbprint", "AB", "--allocation-reply", "{}", "--allocation-script", "/bin/true")
		assert.Equal(t, 2, code)
	})
}
