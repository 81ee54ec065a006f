package hubtest

import (
	"maps"
	"time"
)

// DeviceState is what a hub keeps of one device that a restart must not lose: the registry
// entry, the twin, the cloud-to-device messages not yet acknowledged and, for a device whose
// last connection asked for CleanSession 0, its MQTT session. What belongs to the current
// connection (being connected, messages in flight) is not part of it.
type DeviceState struct {
	Device // Device.InitialTwin is not used
	Twin   Twin
	C2D    []C2DMessage
	// Persistent says the last connection asked for CleanSession 0; Subscriptions are its
	// session's, opaque to anyone but the hub.
	Persistent    bool
	Subscriptions map[string]byte
	// Of the last connection.
	ClientType, ModelID, APIVersion string
	LastSeen                        time.Time
}

// Journal is told of every change to a hub's durable state, so that an emulator can keep it
// across restarts (Restore puts it back): a device's state after each change to it, its
// removal, each telemetry message. The hub calls it with its lock held, in the order of the
// changes, before it acknowledges them: when it fails, the device's request goes
// unanswered (a telemetry message gets no PUBACK, a twin request a 500, a CONNECT return
// code 3) and an operator call returns the error.
type Journal interface {
	SaveDevice(hub string, d DeviceState) error
	DeleteDevice(hub, deviceID string) error
	SaveTelemetry(hub string, t Telemetry) error
}

// WithJournal sends the hub's changes to j.
func WithJournal(j Journal) Option { return func(o *serverOptions) { o.journal = j } }

// Restore replaces the hub's registry and recorded telemetry (oldest first) with what a
// Journal was told, before the hub serves.
func (h *Hub) Restore(devices []DeviceState, telemetry []Telemetry) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.devices = make(map[string]*device, len(devices))
	for _, s := range devices {
		if s.ID == "" {
			return errEmptyID
		}
		d := &device{Device: s.Device, subs: maps.Clone(s.Subscriptions), persistent: s.Persistent,
			twin: twin{desired: deepCopy(s.Twin.Desired), reported: deepCopy(s.Twin.Reported),
				desiredVersion: s.Twin.DesiredVersion, reportedVersion: s.Twin.ReportedVersion},
			clientType: s.ClientType, modelID: s.ModelID, apiVersion: s.APIVersion, lastSeen: s.LastSeen,
			methods: map[string]chan MethodResult{}}
		d.InitialTwin = nil
		if d.subs == nil {
			d.subs = map[string]byte{}
		}
		for _, m := range s.C2D {
			d.c2d = append(d.c2d, &c2dMessage{C2DMessage: m})
		}
		h.devices[s.ID] = d
	}
	if len(telemetry) > MaxRecorded {
		telemetry = telemetry[len(telemetry)-MaxRecorded:]
	}
	h.telemetry = append([]Telemetry(nil), telemetry...)
	h.broadcast()
	return nil
}

// state is the device's DeviceState; h.mu is held.
func (d *device) state() DeviceState {
	s := DeviceState{Device: d.Device, Twin: d.twin.export(), Persistent: d.persistent,
		Subscriptions: maps.Clone(d.subs), ClientType: d.clientType, ModelID: d.modelID,
		APIVersion: d.apiVersion, LastSeen: d.lastSeen}
	s.InitialTwin = nil
	for _, m := range d.c2d {
		s.C2D = append(s.C2D, m.C2DMessage)
	}
	return s
}

// save tells the journal of the device's new state; h.mu is held.
func (h *Hub) save(d *device) error {
	if h.journal == nil {
		return nil
	}
	return h.journal.SaveDevice(h.Name(), d.state())
}

// forget tells the journal that the device is gone from this hub; h.mu is held.
func (h *Hub) forget(id string) error {
	if h.journal == nil {
		return nil
	}
	return h.journal.DeleteDevice(h.Name(), id)
}
