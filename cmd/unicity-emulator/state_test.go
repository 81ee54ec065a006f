package main

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/pki"
)

func tempStore(t *testing.T) (*store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), stateFile)
	s, r, err := openStore(path)
	require.NoError(t, err)
	assert.Nil(t, r.layout, "a new directory has no layout")
	t.Cleanup(func() { s.close() })
	return s, path
}

func reopen(t *testing.T, path string) *restored {
	t.Helper()
	s, r, err := openStore(path)
	require.NoError(t, err)
	require.NoError(t, s.close())
	return r
}

// TestStoreRoundTrip: what the services told the store comes back as it was, twin numbers
// exact, certificates whole.
func TestStoreRoundTrip(t *testing.T) {
	s, path := tempStore(t)
	ca, err := pki.NewRoot("store test")
	require.NoError(t, err)
	dev := hubtest.DeviceState{
		Device: hubtest.Device{ID: "gw-1", CAs: []*x509.Certificate{ca.Certificate}, Thumbprints: []string{"AB"},
			SymmetricKeys: [][]byte{[]byte("key")}, Disabled: true},
		Twin: hubtest.Twin{Desired: map[string]any{"n": json.Number("12345678901234567890"), "o": map[string]any{"s": "x"}},
			Reported: map[string]any{"fw": "1.2"}, DesiredVersion: 4, ReportedVersion: 7},
		C2D:        []hubtest.C2DMessage{{ID: "m-1", Payload: []byte{0, 1, 2}, Properties: map[string]string{"prio": "high"}}},
		Persistent: true, Subscriptions: map[string]byte{"c2d": 1}, ClientType: "sdk/1", ModelID: "dtmi:x;1",
		APIVersion: "2021-04-12", LastSeen: time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC),
	}
	tel := hubtest.Telemetry{DeviceID: "gw-1", Payload: []byte("{}"), Properties: map[string]string{"a": "b"},
		System: map[string]string{"$.ct": "application/json"}, QoS: 1, Received: time.Date(2026, 1, 2, 3, 4, 6, 0, time.UTC)}
	reg := dpstest.Registration{RegistrationID: "GW-1", EnrollmentID: "factory", DeviceID: "gw-1", Hub: "127.1.2.2",
		Status: "assigned", Substatus: dpstest.InitialAssignment, Created: time.Unix(100, 0).UTC(), Updated: time.Unix(200, 0).UTC(),
		Hubs: []string{"127.1.2.2"}}
	att := dpstest.Attempt{Seq: 1, RegistrationID: "GW-1", OperationID: "4.x.y", Requested: time.Unix(100, 0).UTC(),
		Outcome: dpstest.OutcomeAssigned, Status: 200, Polls: 2, Hub: "127.1.2.2", DeviceID: "gw-1"}
	layout := layoutRecord{DPS: "127.0.0.1:1", DPSWS: "127.0.0.1:2", Hubs: []hubLayoutRecord{{Name: "127.1.2.2", Addr: "127.1.2.2:8883", WS: "127.1.2.2:443"}}}

	require.NoError(t, s.SaveDevice("127.1.2.2", dev))
	require.NoError(t, s.SaveTelemetry("127.1.2.2", tel))
	require.NoError(t, s.SaveRegistration(reg))
	require.NoError(t, s.SaveAttempt(att))
	require.NoError(t, s.saveLayout(layout))
	require.NoError(t, s.SaveRegistration(dpstest.Registration{RegistrationID: "gone"}))
	require.NoError(t, s.DeleteRegistration("GONE"))
	require.NoError(t, s.close())

	r := reopen(t, path)
	require.Len(t, r.devices["127.1.2.2"], 1)
	assert.Equal(t, dev, r.devices["127.1.2.2"][0])
	assert.Equal(t, []hubtest.Telemetry{tel}, r.telemetry["127.1.2.2"])
	require.NoError(t, s.close())
	s, _, err = openStore(path)
	require.NoError(t, err)
	bare := hubtest.Telemetry{DeviceID: "gw-1", Properties: map[string]string{}, System: map[string]string{}}
	require.NoError(t, s.SaveTelemetry("127.1.2.2", bare))
	require.NoError(t, s.close())
	assert.Equal(t, []hubtest.Telemetry{tel, bare}, reopen(t, path).telemetry["127.1.2.2"], "empty property maps stay maps")
	assert.Equal(t, []dpstest.Registration{reg}, r.regs)
	assert.Equal(t, []dpstest.Attempt{att}, r.attempts)
	assert.Equal(t, &layout, r.layout)
	assert.Zero(t, r.skipped)
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "it holds symmetric keys")
}

// TestStoreMoves: a device saved on another hub has left the first; the first hub's late
// deletion does not remove it from its new one, whatever the order a crash leaves.
func TestStoreMoves(t *testing.T) {
	s, path := tempStore(t)
	dev := hubtest.DeviceState{Device: hubtest.Device{ID: "gw-1"}}
	require.NoError(t, s.SaveDevice("hub-a", dev))
	require.NoError(t, s.SaveDevice("hub-b", dev))
	require.NoError(t, s.close())
	r := reopen(t, path)
	assert.Empty(t, r.devices["hub-a"], "saved on hub-b: a crash before hub-a's deletion loses nothing")
	assert.Len(t, r.devices["hub-b"], 1)

	s, _, err := openStore(path)
	require.NoError(t, err)
	require.NoError(t, s.DeleteDevice("hub-a", "gw-1"))
	require.NoError(t, s.close())
	assert.Len(t, reopen(t, path).devices["hub-b"], 1)

	s, _, err = openStore(path)
	require.NoError(t, err)
	require.NoError(t, s.DeleteDevice("hub-b", "gw-1"))
	require.NoError(t, s.close())
	assert.Empty(t, reopen(t, path).devices)
}

// TestStoreSurvivesAKillAnywhere cuts the file at every byte, as a kill in the middle of a
// write leaves it: each cut opens, with exactly the changes whose line is whole.
func TestStoreSurvivesAKillAnywhere(t *testing.T) {
	s, path := tempStore(t)
	const writes = 12
	for v := 1; v <= writes; v++ {
		require.NoError(t, s.SaveDevice("hub", hubtest.DeviceState{Device: hubtest.Device{ID: "gw"},
			Twin: hubtest.Twin{ReportedVersion: v}}))
	}
	require.NoError(t, s.close())
	full, err := os.ReadFile(path)
	require.NoError(t, err)
	header := bytes.IndexByte(full, '\n') + 1

	dir := t.TempDir()
	for cut := header; cut <= len(full); cut++ {
		p := filepath.Join(dir, strconv.Itoa(cut))
		require.NoError(t, os.WriteFile(p, full[:cut], 0o600))
		r := reopen(t, p)
		whole := bytes.Count(full[header:cut], []byte("\n"))
		if whole == 0 {
			assert.Empty(t, r.devices, "cut at %d", cut)
			continue
		}
		require.Len(t, r.devices["hub"], 1, "cut at %d", cut)
		assert.Equal(t, whole, r.devices["hub"][0].Twin.ReportedVersion, "cut at %d", cut)
		torn := cut < len(full) && full[cut-1] != '\n'
		assert.Equal(t, torn, r.skipped == 1, "cut at %d", cut)
	}
}

// TestStoreSkipsAnUnreadableLine: a line spoilt in the middle costs that change only.
func TestStoreSkipsAnUnreadableLine(t *testing.T) {
	s, path := tempStore(t)
	require.NoError(t, s.SaveDevice("hub", hubtest.DeviceState{Device: hubtest.Device{ID: "a"}}))
	require.NoError(t, s.close())
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	require.NoError(t, err)
	f.WriteString("{\"device\":{\"hub\n")
	f.Close()
	s, _, err = openStore(path)
	require.NoError(t, err)
	require.NoError(t, s.SaveDevice("hub", hubtest.DeviceState{Device: hubtest.Device{ID: "b"}}))
	require.NoError(t, s.close())
	r := reopen(t, path)
	assert.Len(t, r.devices["hub"], 2)
}

// TestStoreCompacts: a file of superseded lines is rewritten with the live ones.
func TestStoreCompacts(t *testing.T) {
	s, path := tempStore(t)
	big := bytes.Repeat([]byte("x"), 64<<10)
	for range 2 * compactAbove / len(big) {
		require.NoError(t, s.SaveDevice("hub", hubtest.DeviceState{Device: hubtest.Device{ID: "gw"},
			C2D: []hubtest.C2DMessage{{ID: "m", Payload: big}}}))
	}
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Less(t, fi.Size(), int64(compactAbove), "rewritten along the way")
	require.NoError(t, s.close())
	assert.Len(t, reopen(t, path).devices["hub"], 1)

	// Telemetry is kept up to the hub's own bound.
	s, _, err = openStore(path)
	require.NoError(t, err)
	for i := range hubtest.MaxRecorded + 5 {
		require.NoError(t, s.SaveTelemetry("hub", hubtest.Telemetry{DeviceID: strconv.Itoa(i)}))
	}
	require.NoError(t, s.close())
	tel := reopen(t, path).telemetry["hub"]
	require.Len(t, tel, hubtest.MaxRecorded)
	assert.Equal(t, "5", tel[0].DeviceID, "the oldest are dropped")
}

// TestStoreFailsStop: after a write fails the store takes nothing more and says so; the file
// keeps what was written before.
func TestStoreFailsStop(t *testing.T) {
	s, path := tempStore(t)
	require.NoError(t, s.SaveDevice("hub", hubtest.DeviceState{Device: hubtest.Device{ID: "kept"}}))
	s.f.Close() // the next write fails as on a full or read-only disk
	err := s.SaveDevice("hub", hubtest.DeviceState{Device: hubtest.Device{ID: "lost"}})
	require.Error(t, err)
	assert.ErrorContains(t, err, "cannot save the emulator's state")
	select {
	case <-s.failed:
	default:
		t.Fatal("failed is not closed")
	}
	assert.Equal(t, err, s.SaveAttempt(dpstest.Attempt{Seq: 1}))
	assert.Equal(t, err, s.failure())
	r := reopen(t, path)
	require.Len(t, r.devices["hub"], 1)
	assert.Equal(t, "kept", r.devices["hub"][0].ID)
}

func TestStoreRefusesAnotherVersion(t *testing.T) {
	path := filepath.Join(t.TempDir(), stateFile)
	require.NoError(t, os.WriteFile(path, []byte("{\"version\":2}\n"), 0o600))
	_, _, err := openStore(path)
	assert.ErrorContains(t, err, "unsupported version 2")
}
