package hubtest_test

import (
	"crypto/x509"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/hub/hubtest"
)

// journal keeps the latest state of each device and every telemetry message, as a store
// would; fail makes every call fail.
type journal struct {
	mu        sync.Mutex
	devices   map[string]hubtest.DeviceState // by device ID
	telemetry []hubtest.Telemetry
	fail      error
}

func newJournal() *journal { return &journal{devices: map[string]hubtest.DeviceState{}} }

func (j *journal) SaveDevice(_ string, d hubtest.DeviceState) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.fail == nil {
		j.devices[d.ID] = d
	}
	return j.fail
}

func (j *journal) DeleteDevice(_, id string) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	delete(j.devices, id)
	return j.fail
}

func (j *journal) SaveTelemetry(_ string, t hubtest.Telemetry) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.fail == nil {
		j.telemetry = append(j.telemetry, t)
	}
	return j.fail
}

func (j *journal) saved() ([]hubtest.DeviceState, []hubtest.Telemetry) {
	j.mu.Lock()
	defer j.mu.Unlock()
	var devs []hubtest.DeviceState
	for _, d := range j.devices {
		devs = append(devs, d)
	}
	return devs, append([]hubtest.Telemetry(nil), j.telemetry...)
}

// TestRestore: what the journal was told brings a new hub back to where the old one was: the
// registry with statuses, twins at their versions, unacknowledged C2D messages, a
// CleanSession 0 device's subscriptions, telemetry.
func TestRestore(t *testing.T) {
	j := newJournal()
	f := newFixture(t, hubtest.WithJournal(j))
	cert := f.device(t, "dev")
	f.device(t, "off")
	require.NoError(t, f.srv.SetDisabled("off", true))

	c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert, clean: false})
	c.subscribe(t, "devices/dev/messages/devicebound/#", 1)
	c.subscribe(t, "$iothub/twin/res/#", 0)
	c.publish(t, "$iothub/twin/PATCH/properties/reported/?$rid=1", 0, []byte(`{"fw":"1.2"}`))
	assert.Equal(t, "$iothub/twin/res/204/?$rid=1&$version=2", c.next(t).Topic())
	c.publish(t, "devices/dev/messages/events/kind=boot", 1, []byte("up"))
	c.Disconnect(0)
	_, err := f.srv.PatchDesired("dev", []byte(`{"interval":30}`))
	require.NoError(t, err)
	id, err := f.srv.SendC2D("dev", []byte("while away"), map[string]string{"prio": "high"})
	require.NoError(t, err)
	before, err := f.srv.Twin("dev")
	require.NoError(t, err)
	f.srv.Close()

	again := &fixture{srv: hubtest.NewServer(t, hubtest.WithCA(f.srv.CA)), factory: f.factory}
	devs, tel := j.saved()
	require.NoError(t, again.srv.Restore(devs, tel))
	assert.Equal(t, f.srv.Devices()[0].Auth, again.srv.Devices()[0].Auth)
	info, err := again.srv.Device("off")
	require.NoError(t, err)
	assert.Equal(t, "disabled", info.Status)
	_, err = again.connect(t, clientConfig{id: "off", cert: &cert})
	assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)
	tw, err := again.srv.Twin("dev")
	require.NoError(t, err)
	assert.Equal(t, before, tw)
	assert.Equal(t, 2, tw.DesiredVersion)
	assert.Equal(t, 2, tw.ReportedVersion)
	got := again.srv.Telemetry("dev")
	require.Len(t, got, 1)
	assert.Equal(t, "up", string(got[0].Payload))
	assert.Equal(t, map[string]string{"kind": "boot"}, got[0].Properties)

	// The session resumes: the C2D message comes without subscribing again.
	c = again.mustConnect(t, clientConfig{id: "dev", cert: &cert, clean: false})
	assert.True(t, c.sessionPresent)
	m := c.next(t)
	assert.Equal(t, "while away", string(m.Payload()))
	assert.Contains(t, m.Topic(), "%24.mid="+id)
}

// TestJournalFailure: what cannot be saved is not acknowledged.
func TestJournalFailure(t *testing.T) {
	j := newJournal()
	f := newFixture(t, hubtest.WithJournal(j))
	cert := f.device(t, "dev")
	c := f.mustConnect(t, clientConfig{id: "dev", cert: &cert})
	c.subscribe(t, "$iothub/twin/res/#", 0)
	j.mu.Lock()
	j.fail = errors.New("disk full")
	j.mu.Unlock()

	c.publish(t, "$iothub/twin/PATCH/properties/reported/?$rid=1", 0, []byte(`{"fw":"1.2"}`))
	assert.Equal(t, "$iothub/twin/res/500/?$rid=1", c.next(t).Topic())
	_, err := f.srv.SendC2D("dev", []byte("x"), nil)
	assert.ErrorContains(t, err, "disk full")
	pending, err := f.srv.PendingC2D("dev")
	require.NoError(t, err)
	assert.Empty(t, pending)
	assert.Error(t, f.srv.Register(hubtest.Device{ID: "new", CAs: []*x509.Certificate{f.factory.Certificate}}))

	tok := c.Publish("devices/dev/messages/events/", 1, false, []byte("lost?"))
	c.waitLost(t)
	if tok.WaitTimeout(time.Second) {
		assert.Error(t, tok.Error(), "no PUBACK: the device still holds the message")
	}
	assert.Empty(t, f.srv.Telemetry("dev"))

	_, err = f.connect(t, clientConfig{id: "dev", cert: &cert})
	assert.ErrorIs(t, err, packets.ErrorRefusedServerUnavailable, "a session that cannot be saved is refused as a transient failure")
}
