package hubtest

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/hub"
)

// Topic names and filters of IoT Hub's MQTT surface (protocol.md §5).
const (
	twinResFilter     = "$iothub/twin/res/#"
	twinDesiredFilter = "$iothub/twin/PATCH/properties/desired/#"
	methodsFilter     = "$iothub/methods/POST/#"

	twinGetPrefix     = "$iothub/twin/GET/"
	twinPatchPrefix   = "$iothub/twin/PATCH/properties/reported/"
	methodResPrefix   = "$iothub/methods/res/"
	methodPostPrefix  = "$iothub/methods/POST/"
	twinResPrefix     = "$iothub/twin/res/"
	desiredPatchTopic = "$iothub/twin/PATCH/properties/desired/?$version="
)

func c2dFilter(deviceID string) string         { return "devices/" + deviceID + "/messages/devicebound/#" }
func c2dPrefix(deviceID string) string         { return "devices/" + deviceID + "/messages/devicebound/" }
func eventsPrefix(deviceID string) string      { return "devices/" + deviceID + "/messages/events" }
func sasResource(host, deviceID string) string { return host + "/devices/" + deviceID }

// identity is what a CONNECT username names: {host}/{deviceId}[/{moduleId}]/?{query}.
type identity struct {
	host, deviceID, moduleID string
	query                    map[string]string
}

var errBadUsername = errors.New("malformed username")

// parseUsername splits the username on '/' rather than searching for "/?", because a device
// ID may itself contain '?' but never '/'.
func parseUsername(s string) (identity, error) {
	host, rest, ok := strings.Cut(s, "/")
	if !ok || host == "" {
		return identity{}, fmt.Errorf("%w %q: no host", errBadUsername, s)
	}
	dev, rest, ok := strings.Cut(rest, "/")
	if !ok || dev == "" {
		return identity{}, fmt.Errorf("%w %q: no device ID", errBadUsername, s)
	}
	id := identity{host: host, deviceID: dev}
	if !strings.HasPrefix(rest, "?") {
		mod, tail, ok := strings.Cut(rest, "/")
		if !ok || mod == "" || !strings.HasPrefix(tail, "?") {
			return identity{}, fmt.Errorf("%w %q: no '/?' before the query", errBadUsername, s)
		}
		id.moduleID, rest = mod, tail
	}
	id.query = parseQuery(rest[1:])
	if id.query["api-version"] == "" {
		return identity{}, fmt.Errorf("%w %q: no api-version", errBadUsername, s)
	}
	return id, nil
}

// parseQuery reads k=v pairs in any order. Values that are not valid percent-encoding are
// kept as sent: some SDKs put their user agent in raw. A key without '=' maps to "".
func parseQuery(s string) map[string]string {
	q := make(map[string]string)
	for _, kv := range strings.Split(s, "&") {
		if kv == "" {
			continue
		}
		k, v, _ := strings.Cut(kv, "=")
		q[unescape(k)] = unescape(v)
	}
	return q
}

// unescape keeps '+' as a plus: property bags are percent-encoded, not form-encoded, and
// the Embedded C SDK passes application values through unencoded.
func unescape(s string) string {
	if u, err := url.PathUnescape(s); err == nil {
		return u
	}
	return s
}

// parseProperties splits a telemetry property bag into application and system ($.-prefixed)
// properties.
func parseProperties(bag string) (app, sys map[string]string) {
	app, sys = map[string]string{}, map[string]string{}
	for k, v := range hub.DecodeProperties(strings.TrimPrefix(bag, "/")) {
		if strings.HasPrefix(k, "$.") {
			sys[k] = v
		} else {
			app[k] = v
		}
	}
	return app, sys
}

// requestID returns the $rid of a request topic such as "$iothub/twin/GET/?$rid=7".
func requestID(topic string) (string, bool) {
	_, query, ok := strings.Cut(topic, "?")
	if !ok {
		return "", false
	}
	rid, ok := parseQuery(query)["$rid"]
	return rid, ok && rid != ""
}

var errBadSAS = errors.New("invalid shared access signature")

// checkSAS verifies a password of the form
// "SharedAccessSignature sr={resource}&sig={signature}&se={expiry}[&skn={name}]" against the
// device's keys. resources are the accepted decoded values of sr, one per hub name.
func checkSAS(password string, resources []string, keys [][]byte, now time.Time) error {
	fields, ok := strings.CutPrefix(password, "SharedAccessSignature ")
	if !ok {
		return fmt.Errorf("%w: no SharedAccessSignature prefix", errBadSAS)
	}
	raw := map[string]string{}
	for _, kv := range strings.Split(fields, "&") {
		k, v, _ := strings.Cut(kv, "=")
		raw[k] = v
	}
	sr, sig, se := raw["sr"], raw["sig"], raw["se"]
	if sr == "" || sig == "" || se == "" {
		return fmt.Errorf("%w: sr, sig and se are required", errBadSAS)
	}
	resource := unescape(sr)
	known := false
	for _, r := range resources {
		known = known || strings.EqualFold(resource, r)
	}
	if !known {
		return fmt.Errorf("%w: resource %q is not this device on this hub", errBadSAS, resource)
	}
	expiry, err := strconv.ParseInt(se, 10, 64)
	if err != nil {
		return fmt.Errorf("%w: expiry %q: %w", errBadSAS, se, err)
	}
	if !now.Before(time.Unix(expiry, 0)) {
		return fmt.Errorf("%w: expired at %s", errBadSAS, time.Unix(expiry, 0).UTC().Format(time.RFC3339))
	}
	got, err := base64.StdEncoding.DecodeString(unescape(sig))
	if err != nil {
		return fmt.Errorf("%w: signature is not base64: %w", errBadSAS, err)
	}
	// SDKs differ in how they percent-encode the resource they sign (%2f or %2F); accept the
	// form sent and the canonical forms.
	canonical := url.QueryEscape(resource)
	signed := []string{sr, canonical, lowerEscapes(canonical)}
	for _, key := range keys {
		for _, s := range signed {
			mac := hmac.New(sha256.New, key)
			mac.Write([]byte(s + "\n" + se))
			if hmac.Equal(mac.Sum(nil), got) {
				return nil
			}
		}
	}
	return fmt.Errorf("%w: signature does not match the device's keys", errBadSAS)
}

// lowerEscapes turns %2F into %2f, the form the Embedded C SDK signs.
func lowerEscapes(s string) string {
	b := []byte(s)
	for i := 0; i+2 < len(b); i++ {
		if b[i] == '%' {
			b[i+1] = toLowerHex(b[i+1])
			b[i+2] = toLowerHex(b[i+2])
		}
	}
	return string(b)
}

func toLowerHex(c byte) byte {
	if c >= 'A' && c <= 'F' {
		return c + 'a' - 'A'
	}
	return c
}
