package hubtest

import (
	"encoding/json"
	"fmt"
	"net/http"
)

// Faults for client robustness tests: the transient failures a real hub shows now and then.

// FailConnects answers the next n CONNECTs, from any device, with return code (3 is "server
// unavailable", which clients retry; 4 and 5 are not retried), before authenticating them.
func (h *Hub) FailConnects(n int, code byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.failConnects, h.failConnectCode = n, code
}

// FailTwin answers the next n twin requests (GET or reported PATCH), from any device, with
// status (429 throttled, 5xx) and an error body, leaving the twin as it is.
func (h *Hub) FailTwin(n, status int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.failTwin, h.failTwinStatus = n, status
}

// Disconnect closes the device's connection without changing its registry entry, as a hub
// restart or a network fault does; the device may connect again at once.
func (h *Hub) Disconnect(id string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, err := h.lookup(id)
	if err != nil {
		return err
	}
	if d.conn == nil {
		return fmt.Errorf("%w: %q", ErrDeviceNotOnline, id)
	}
	h.kick(d)
	h.broadcast()
	return nil
}

// injectedConnectFailure consumes one FailConnects; h.mu is held.
func (h *Hub) injectedConnectFailure() error {
	if h.failConnects == 0 {
		return nil
	}
	h.failConnects--
	return refuse(h.failConnectCode, "injected failure (FailConnects)")
}

// injectedTwinFailure consumes one FailTwin and returns its status and body, or 0.
func (h *Hub) injectedTwinFailure() (int, []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.failTwin == 0 {
		return 0, nil
	}
	h.failTwin--
	body, _ := json.Marshal(map[string]any{"errorCode": h.failTwinStatus * 1000,
		"message": http.StatusText(h.failTwinStatus) + " (injected by FailTwin)"})
	return h.failTwinStatus, body
}
