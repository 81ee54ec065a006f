package hubtest

import (
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/internal/mqttsrv"
)

// Device is a registry entry as a test or DPS creates it. A device may hold several kinds
// of credential: a presented certificate is checked against CAs and Thumbprints, otherwise
// the password against SymmetricKeys.
type Device struct {
	ID string
	// CAs authenticate "CA-signed" devices: the presented chain must verify up to one of
	// them (intermediates come from the TLS handshake) and the leaf's CN must equal ID.
	CAs []*x509.Certificate
	// Thumbprints authenticate "self-signed" devices: the leaf's SHA-256 or SHA-1 hex
	// thumbprint, case-insensitive.
	Thumbprints []string
	// SymmetricKeys are the primary and secondary keys for SAS tokens.
	SymmetricKeys [][]byte
	// Issued are the device's operational certificates, issued by DPS or by the hub's
	// issueCertificate (credentials.go): each authenticates it until it expires or is
	// revoked. Register adds to those the device holds; it does not replace them.
	Issued []*x509.Certificate
	// Disabled devices are refused with CONNACK 5.
	Disabled bool
	// InitialTwin is the desired-properties object a new device starts with (DPS enrollments
	// carry one); ignored when the device exists.
	InitialTwin json.RawMessage
}

// DeviceInfo is a registry entry as the controls report it.
type DeviceInfo struct {
	ID         string    `json:"device_id"`
	Auth       []string  `json:"auth"`   // "x509-ca", "x509-thumbprint", "sas"
	Status     string    `json:"status"` // "enabled" or "disabled"
	Connected  bool      `json:"connected"`
	ClientType string    `json:"client_type,omitempty"`
	ModelID    string    `json:"model_id,omitempty"`
	APIVersion string    `json:"api_version,omitempty"`
	PendingC2D int       `json:"pending_c2d"`
	LastSeen   time.Time `json:"last_seen,omitzero"`
	// Operational are the certificates issued to the device that the hub accepts.
	Operational []CertificateInfo `json:"operational_certificates,omitempty"`
}

// device is the registry entry and the device's persistent MQTT session.
type device struct {
	Device
	conn       *mqttsrv.Conn   // current connection, nil when offline
	subs       map[string]byte // granted QoS per subscription kind (session state)
	persistent bool            // the last connection asked for CleanSession 0
	c2d        []*c2dMessage
	twin       twin
	clientType string
	modelID    string
	apiVersion string
	lastSeen   time.Time
	methods    map[string]chan MethodResult // pending invocations by $rid
}

// subscription kinds; the key of device.subs.
const (
	subC2D         = "c2d"
	subTwinRes     = "twin-res"
	subTwinDesired = "twin-desired"
	subMethods     = "methods"
)

// Register creates a device, or updates the credentials and status of an existing one
// (keeping its twin, session and queue).
func (h *Hub) Register(d Device) error { return h.register(d, false, false) }

// register is Register that, with resetTwin, also replaces an existing device's twin with
// d.InitialTwin (DPS reprovisioning with "reset to initial config"); the versions move on so
// that a connected device sees the change as newer. With keepStatus, an existing device keeps
// its status whatever d says: a DPS assignment updates credentials, never the status, so
// that a device disabled on the hub stays disabled through re-provisioning.
func (h *Hub) register(d Device, resetTwin, keepStatus bool) error {
	if d.ID == "" {
		return errEmptyID
	}
	var desired map[string]any
	if len(d.InitialTwin) > 0 {
		if err := unmarshalObject(d.InitialTwin, &desired); err != nil {
			return fmt.Errorf("hubtest: initial twin of %q: %w", d.ID, err)
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if dev, ok := h.devices[d.ID]; ok {
		if keepStatus {
			d.Disabled = dev.Disabled
		}
		d.Issued = mergeIssued(dev.Issued, d.Issued, h.now())
		dev.Device = d
		if d.Disabled {
			h.kick(dev)
		}
		if resetTwin {
			old := dev.twin
			dev.twin = newTwin(desired)
			dev.twin.desiredVersion, dev.twin.reportedVersion = old.desiredVersion+1, old.reportedVersion+1
		}
		h.broadcast()
		return h.save(dev)
	}
	dev := &device{Device: d, subs: map[string]byte{}, twin: newTwin(desired), methods: map[string]chan MethodResult{}}
	h.devices[d.ID] = dev
	h.broadcast()
	return h.save(dev)
}

var errEmptyID = errors.New("hubtest: device ID is empty")

// Devices lists the registry, sorted by device ID.
func (h *Hub) Devices() []DeviceInfo {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]DeviceInfo, 0, len(h.devices))
	for _, d := range h.devices {
		out = append(out, d.info())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// DeviceCount is the number of devices in the registry.
func (h *Hub) DeviceCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.devices)
}

// Device returns one registry entry.
func (h *Hub) Device(id string) (DeviceInfo, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.lookup(id)
	if err != nil {
		return DeviceInfo{}, err
	}
	return d.info(), nil
}

// Connected reports whether the device has a live connection.
func (h *Hub) Connected(id string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.devices[id]
	return ok && d.conn != nil
}

// SetDisabled disables or re-enables a device. Disabling closes its connection and refuses
// the next CONNECTs with return code 5.
func (h *Hub) SetDisabled(id string, disabled bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.lookup(id)
	if err != nil {
		return err
	}
	d.Disabled = disabled
	if disabled {
		h.kick(d)
	}
	h.broadcast()
	return h.save(d)
}

// Delete removes a device with its twin and queue, closing its connection.
func (h *Hub) Delete(id string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.lookup(id)
	if err != nil {
		return err
	}
	h.kick(d)
	delete(h.devices, id)
	h.broadcast()
	return h.forget(id)
}

// Move re-homes a device on another hub with its credentials, twin and queued messages, as
// a DPS reassignment with data migration does: the device's connection here is closed and
// its next CONNECT here is refused with return code 5. The journals hear of the device on
// its new hub before they hear it left this one, so that a crash in between loses nothing.
func (h *Hub) Move(id string, to *Hub) error {
	if to == h {
		return fmt.Errorf("hubtest: cannot move %q to the hub it is on", id)
	}
	h.mu.Lock()
	d, err := h.lookup(id)
	if err != nil {
		h.mu.Unlock()
		return err
	}
	h.kick(d)
	delete(h.devices, id)
	moved := &device{Device: d.Device, subs: map[string]byte{}, twin: d.twin.clone(),
		methods: map[string]chan MethodResult{}}
	for _, m := range d.c2d {
		moved.c2d = append(moved.c2d, &c2dMessage{C2DMessage: m.C2DMessage})
	}
	h.broadcast()
	h.mu.Unlock()

	to.mu.Lock()
	if old, ok := to.devices[id]; ok {
		to.kick(old)
	}
	to.devices[id] = moved
	to.broadcast()
	err = to.save(moved)
	to.mu.Unlock()
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.forget(id)
}

func (h *Hub) lookup(id string) (*device, error) {
	d, ok := h.devices[id]
	if !ok {
		return nil, fmt.Errorf("%w: %q on %s", ErrDeviceNotFound, id, h.Name())
	}
	return d, nil
}

// kick closes the device's connection; its Disconnected callback tidies up. h.mu is held,
// so the close runs outside it: a TLS close may wait seconds on a peer that does not read.
func (h *Hub) kick(d *device) {
	if d.conn == nil {
		return
	}
	c := d.conn
	d.conn = nil
	h.stats.Kicked++
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		c.Close()
	}()
}

func (d *device) info() DeviceInfo {
	in := DeviceInfo{ID: d.ID, Status: "enabled", Connected: d.conn != nil, ClientType: d.clientType,
		ModelID: d.modelID, APIVersion: d.apiVersion, PendingC2D: len(d.c2d), LastSeen: d.lastSeen}
	if d.Disabled {
		in.Status = "disabled"
	}
	if len(d.CAs) > 0 {
		in.Auth = append(in.Auth, "x509-ca")
	}
	if len(d.Thumbprints) > 0 {
		in.Auth = append(in.Auth, "x509-thumbprint")
	}
	if len(d.SymmetricKeys) > 0 {
		in.Auth = append(in.Auth, "sas")
	}
	if len(d.Issued) > 0 {
		in.Auth = append(in.Auth, "x509-issued")
		in.Operational = issuedInfo(d.Issued)
	}
	return in
}

// authenticateX509 checks the TLS peer chain (leaf first) against the device's operational
// certificates, CAs and thumbprints.
func (d *device) authenticateX509(peer []*x509.Certificate, now time.Time) error {
	leaf := peer[0]
	var errs []error
	if len(d.Issued) > 0 {
		err := d.authenticateIssued(leaf, now)
		if err == nil {
			return nil
		}
		errs = append(errs, err)
	}
	if len(d.CAs) > 0 {
		roots, inters := x509.NewCertPool(), x509.NewCertPool()
		for _, c := range d.CAs {
			roots.AddCert(c)
		}
		for _, c := range peer[1:] {
			inters.AddCert(c)
		}
		_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, CurrentTime: now,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("certificate chain: %w", err))
		case leaf.Subject.CommonName != d.ID:
			errs = append(errs, fmt.Errorf("certificate CN %q is not the device ID", leaf.Subject.CommonName))
		default:
			return nil
		}
	}
	if len(d.Thumbprints) > 0 {
		s256, s1 := sha256.Sum256(leaf.Raw), sha1.Sum(leaf.Raw)
		for _, tp := range d.Thumbprints {
			if !strings.EqualFold(tp, hex.EncodeToString(s256[:])) && !strings.EqualFold(tp, hex.EncodeToString(s1[:])) {
				continue
			}
			if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
				return fmt.Errorf("certificate outside its validity period (%s to %s)", leaf.NotBefore, leaf.NotAfter)
			}
			return nil
		}
		errs = append(errs, errors.New("certificate thumbprint is not the device's"))
	}
	return errors.Join(errs...)
}
