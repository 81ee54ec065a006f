package hubtest

import (
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

// Fleet is the set of hubs a DPS emulator assigns devices to, each found by any of its
// names. Assign makes it a dpstest.Registrar: assignments register devices in the hub
// registry. Allocate is a dpstest.AllocateFunc that keeps devices on the hub that holds them,
// where an operator may have moved them. In a test, with one CA so that one trust bundle
// covers everything:
//
//	ca, _ := pki.NewRoot("test root")
//	a, b := hubtest.NewServer(t, hubtest.WithCA(ca)), hubtest.NewServer(t, hubtest.WithCA(ca))
//	fleet := hubtest.NewFleet(a.Hub, b.Hub)
//	dps := dpstest.NewServer(t, func(c *dpstest.Config) {
//		c.ServerCA, c.Hubs, c.Registrar = ca, fleet.Names(), fleet
//	})
type Fleet struct {
	mu   sync.Mutex
	hubs []*Hub
}

var _ dpstest.Registrar = (*Fleet)(nil)

// NewFleet returns a fleet of the given hubs.
func NewFleet(hubs ...*Hub) *Fleet {
	return &Fleet{hubs: hubs}
}

// Hubs returns the fleet's hubs in the order given.
func (f *Fleet) Hubs() []*Hub {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.hubs)
}

// Names returns each hub's name (what DPS assigns), in order.
func (f *Fleet) Names() []string {
	var names []string
	for _, h := range f.Hubs() {
		names = append(names, h.Name())
	}
	return names
}

// Hub finds a hub by any of its names.
func (f *Fleet) Hub(name string) (*Hub, error) {
	for _, h := range f.Hubs() {
		if h.isName(name) {
			return h, nil
		}
	}
	return nil, fmt.Errorf("hubtest: no hub named %q", name)
}

// Find returns the hub whose registry holds the device.
func (f *Fleet) Find(deviceID string) (*Hub, error) {
	for _, h := range f.Hubs() {
		if _, err := h.Device(deviceID); err == nil {
			return h, nil
		}
	}
	return nil, fmt.Errorf("%w: %q on any hub", ErrDeviceNotFound, deviceID)
}

// Move moves a device to the named hub (see Hub.Move); Allocate sends it there when it
// registers again.
func (f *Fleet) Move(deviceID, toHub string) error {
	from, err := f.Find(deviceID)
	if err != nil {
		return err
	}
	to, err := f.Hub(toHub)
	if err != nil {
		return err
	}
	return from.Move(deviceID, to)
}

// Allocate chooses a linked hub: the one whose registry holds the device (where it is, or
// where an operator moved it), else the one of its last assignment, else the one with the
// fewest devices (the first on a tie).
func (f *Fleet) Allocate(req dpstest.AllocationRequest) (dpstest.AllocationResult, error) {
	if len(req.LinkedHubs) == 0 {
		return dpstest.AllocationResult{}, errors.New("no linked hubs")
	}
	holder := ""
	if h, err := f.Find(req.DeviceID); err == nil {
		holder = h.Name()
	}
	for _, want := range []string{holder, req.CurrentHub} {
		if want != "" && slices.Contains(req.LinkedHubs, want) {
			return dpstest.AllocationResult{Hub: want}, nil
		}
	}
	best, fewest := req.LinkedHubs[0], -1
	for _, name := range req.LinkedHubs {
		h, err := f.Hub(name)
		if err != nil {
			continue
		}
		if n := h.DeviceCount(); fewest < 0 || n < fewest {
			best, fewest = name, n
		}
	}
	return dpstest.AllocationResult{Hub: best}, nil
}

// Assign registers an assigned device in its hub's registry, moving it (with its twin) from
// the previous hub when DPS re-provisioned it elsewhere, and resetting the twin when DPS
// says so. A device that exists keeps its status: one disabled on its hub stays disabled,
// and is refused at CONNECT after it registers again. Azure keeps the two controls apart:
// deprovisioning a device takes both disabling its enrollment in DPS and disabling (or
// deleting) it in the hub's identity registry (learn.microsoft.com/azure/iot-dps/
// how-to-unprovision-devices).
func (f *Fleet) Assign(a dpstest.Assignment) error {
	to, err := f.Hub(a.Hub)
	if err != nil {
		return err
	}
	if a.PreviousHub != "" && !to.isName(a.PreviousHub) {
		if from, err := f.Hub(a.PreviousHub); err == nil {
			if err := from.Move(a.DeviceID, to); err != nil && !errors.Is(err, ErrDeviceNotFound) {
				return err
			}
		}
	}
	d := Device{ID: a.DeviceID}
	if a.Auth.CA != nil {
		d.CAs = []*x509.Certificate{a.Auth.CA}
	}
	if a.Auth.Thumbprint != "" {
		d.Thumbprints = []string{a.Auth.Thumbprint}
	}
	if a.Auth.SymmetricKey != nil {
		d.SymmetricKeys = [][]byte{a.Auth.SymmetricKey}
	}
	if a.Auth.Issued != nil {
		d.Issued = []*x509.Certificate{a.Auth.Issued}
	}
	reset := a.InitialTwin != nil
	if reset {
		if d.InitialTwin, err = desiredOf(a.InitialTwin); err != nil {
			return fmt.Errorf("hubtest: initial twin of %q: %w", a.DeviceID, err)
		}
	}
	return to.register(d, reset, true)
}

// desiredOf takes the desired properties from an enrollment's initial twin, which Azure
// shapes as {"tags":…,"properties":{"desired":…}}; an object without those keys is taken as
// the desired properties themselves.
func desiredOf(initial json.RawMessage) (json.RawMessage, error) {
	var shaped struct {
		Tags       json.RawMessage `json:"tags"`
		Properties *struct {
			Desired json.RawMessage `json:"desired"`
		} `json:"properties"`
	}
	if err := json.Unmarshal(initial, &shaped); err != nil {
		return nil, err
	}
	switch {
	case shaped.Properties != nil && shaped.Properties.Desired != nil:
		return shaped.Properties.Desired, nil
	case shaped.Properties != nil || shaped.Tags != nil:
		return json.RawMessage(`{}`), nil
	}
	return initial, nil
}
