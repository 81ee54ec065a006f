package hubtest_test

import (
	"crypto/x509"
	"encoding/json"
	"testing"

	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/certcodec"
)

func TestFleetAssign(t *testing.T) {
	a := newFixture(t)
	b := &fixture{srv: hubtest.NewServer(t, hubtest.WithCA(a.srv.CA)), factory: a.factory}
	fleet := hubtest.NewFleet(a.srv.Hub, b.srv.Hub)
	assert.Equal(t, []string{a.srv.Name(), b.srv.Name()}, fleet.Names())

	leaf, err := a.factory.NewDevice("dev")
	require.NoError(t, err)
	cert := leaf.TLSCertificate()
	auth := dpstest.DeviceAuth{CA: a.factory.Certificate, Thumbprint: certcodec.Thumbprint(leaf.Certificate())}

	// Initial assignment with an Azure-shaped initial twin.
	require.NoError(t, fleet.Assign(dpstest.Assignment{RegistrationID: "dev", DeviceID: "dev", Hub: a.srv.Name(),
		Substatus: dpstest.InitialAssignment, Auth: auth,
		InitialTwin: json.RawMessage(`{"tags":{"site":"x"},"properties":{"desired":{"mode":"eco"}}}`)}))
	c := a.mustConnect(t, clientConfig{id: "dev", cert: &cert})
	c.subscribe(t, "$iothub/twin/res/#", 0)
	c.publish(t, "$iothub/twin/PATCH/properties/reported/?$rid=1", 0, []byte(`{"fw":"1"}`))
	c.next(t)
	tw, err := a.srv.Twin("dev")
	require.NoError(t, err)
	assert.Equal(t, map[string]any{"mode": "eco"}, tw.Desired)

	// Re-provisioned to the other hub with data migration: the twin moves, the old hub refuses.
	require.NoError(t, fleet.Assign(dpstest.Assignment{RegistrationID: "dev", DeviceID: "dev", Hub: b.srv.Name(),
		PreviousHub: a.srv.Name(), Substatus: dpstest.DeviceDataMigrated, Auth: auth}))
	c.waitLost(t)
	_, err = a.connect(t, clientConfig{id: "dev", cert: &cert})
	assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)
	b.mustConnect(t, clientConfig{id: "dev", cert: &cert})
	tw, err = b.srv.Twin("dev")
	require.NoError(t, err)
	assert.Equal(t, map[string]any{"fw": "1"}, tw.Reported)

	// Reset to the initial twin on the same hub: properties replaced, versions move on.
	require.NoError(t, fleet.Assign(dpstest.Assignment{RegistrationID: "dev", DeviceID: "dev", Hub: b.srv.Name(),
		PreviousHub: b.srv.Name(), Substatus: dpstest.DeviceDataReset, Auth: auth,
		InitialTwin: json.RawMessage(`{"mode":"fast"}`)}))
	tw, err = b.srv.Twin("dev")
	require.NoError(t, err)
	assert.Equal(t, map[string]any{"mode": "fast"}, tw.Desired)
	assert.Empty(t, tw.Reported)
	assert.Equal(t, 3, tw.ReportedVersion)

	// SAS devices get their key.
	require.NoError(t, fleet.Assign(dpstest.Assignment{RegistrationID: "sas", DeviceID: "sas-dev", Hub: a.srv.Name(),
		Auth: dpstest.DeviceAuth{SymmetricKey: []byte("k")}}))
	info, err := a.srv.Device("sas-dev")
	require.NoError(t, err)
	assert.Equal(t, []string{"sas"}, info.Auth)

	assert.Error(t, fleet.Assign(dpstest.Assignment{DeviceID: "x", Hub: "nowhere:1"}))
}

// TestFleetAssignKeepsDisabled: DPS re-provisioning a device that an operator disabled on its
// hub, to the same hub or another, leaves it disabled; only the operator enables it again.
func TestFleetAssignKeepsDisabled(t *testing.T) {
	a := newFixture(t)
	b := &fixture{srv: hubtest.NewServer(t, hubtest.WithCA(a.srv.CA)), factory: a.factory}
	fleet := hubtest.NewFleet(a.srv.Hub, b.srv.Hub)
	leaf, err := a.factory.NewDevice("dev")
	require.NoError(t, err)
	cert := leaf.TLSCertificate()
	assign := func(hub, previous string) {
		t.Helper()
		require.NoError(t, fleet.Assign(dpstest.Assignment{RegistrationID: "dev", DeviceID: "dev", Hub: hub, PreviousHub: previous,
			Substatus: dpstest.InitialAssignment, Auth: dpstest.DeviceAuth{CA: a.factory.Certificate}}))
	}
	assign(a.srv.Name(), "")
	require.NoError(t, a.srv.SetDisabled("dev", true))

	assign(a.srv.Name(), a.srv.Name())
	info, err := a.srv.Device("dev")
	require.NoError(t, err)
	assert.Equal(t, "disabled", info.Status, "re-registered on the same hub")
	_, err = a.connect(t, clientConfig{id: "dev", cert: &cert})
	assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)

	assign(b.srv.Name(), a.srv.Name())
	info, err = b.srv.Device("dev")
	require.NoError(t, err)
	assert.Equal(t, "disabled", info.Status, "moved to another hub by re-provisioning")
	_, err = b.connect(t, clientConfig{id: "dev", cert: &cert})
	assert.ErrorIs(t, err, packets.ErrorRefusedNotAuthorised)

	require.NoError(t, b.srv.SetDisabled("dev", false))
	b.mustConnect(t, clientConfig{id: "dev", cert: &cert})
}

func TestFleetAllocate(t *testing.T) {
	a := newFixture(t)
	b := hubtest.NewServer(t, hubtest.WithCA(a.srv.CA))
	fleet := hubtest.NewFleet(a.srv.Hub, b.Hub)
	linked := fleet.Names()
	ca := []*x509.Certificate{a.factory.Certificate}

	alloc := func(id, current string) string {
		res, err := fleet.Allocate(dpstest.AllocationRequest{RegistrationID: id, DeviceID: id, LinkedHubs: linked, CurrentHub: current})
		require.NoError(t, err)
		return res.Hub
	}
	assert.Equal(t, a.srv.Name(), alloc("d1", ""), "tie: the first hub")
	require.NoError(t, a.srv.Register(hubtest.Device{ID: "d1", CAs: ca}))
	assert.Equal(t, b.Name(), alloc("d2", ""), "the hub with fewer devices")
	assert.Equal(t, a.srv.Name(), alloc("d1", a.srv.Name()), "a device stays where it is")

	require.NoError(t, fleet.Move("d1", b.Name()))
	assert.Equal(t, b.Name(), alloc("d1", a.srv.Name()), "a moved device goes where it was moved")
	h, err := fleet.Find("d1")
	require.NoError(t, err)
	assert.Same(t, b.Hub, h)

	assert.ErrorIs(t, fleet.Move("nobody", b.Name()), hubtest.ErrDeviceNotFound)
	assert.Error(t, fleet.Move("d1", "nowhere:1"))
	_, err = fleet.Allocate(dpstest.AllocationRequest{RegistrationID: "x"})
	assert.Error(t, err)
}
