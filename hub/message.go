package hub

import (
	"fmt"
	"net/url"
	"sort"
	"strings"
)

// System property names as they appear in a message's property bag (protocol.md §5.3).
// Properties whose name starts with "$." are system properties; the rest are the
// application's.
const (
	PropMessageID       = "$.mid"
	PropCorrelationID   = "$.cid"
	PropUserID          = "$.uid"
	PropContentType     = "$.ct"
	PropContentEncoding = "$.ce"
	PropTo              = "$.to"
	PropExpiry          = "$.exp"
	PropCreationTime    = "$.ctime"
	PropComponent       = "$.sub"
)

// Size limits of the hub (protocol.md §5.3, §5.6, §8.12).
const (
	MaxTelemetrySize      = 256 << 10
	MaxMethodResponseSize = 128 << 10
)

// Message is a device-to-cloud telemetry message or a cloud-to-device message.
type Message struct {
	Payload []byte
	// Properties are the application properties and, under their "$." names (PropContentType
	// and friends), the system properties. A property sent without a value arrives as "".
	Properties map[string]string
}

// size is what a message costs the queue: payload and property bag.
func (m Message) size() int {
	n := len(m.Payload)
	for k, v := range m.Properties {
		n += len(k) + len(v) + 2
	}
	return n
}

// Validate says whether the hub takes m as telemetry: ErrTooLarge past MaxTelemetrySize, or
// an error for an empty property name. Enqueue refuses such a message; a store that keeps
// messages for later checks first, so that it never keeps one the hub would refuse forever.
func (m Message) Validate() error {
	for k := range m.Properties {
		if k == "" {
			return fmt.Errorf("empty property name")
		}
	}
	if n := m.size(); n > MaxTelemetrySize {
		return fmt.Errorf("%w: %d bytes, the hub takes %d", ErrTooLarge, n, MaxTelemetrySize)
	}
	return nil
}

// eventsTopic is where telemetry goes: devices/{id}/messages/events/{property bag}.
func eventsTopic(deviceID string, props map[string]string) string {
	return "devices/" + deviceID + "/messages/events/" + EncodeProperties(props)
}

// EncodeProperties builds an IoT Hub property bag (the tail of a telemetry or C2D topic) with
// names and values percent-encoded, system properties first, each group sorted so that the
// same message always makes the same topic. The emulator encodes C2D topics with it too.
func EncodeProperties(props map[string]string) string {
	keys := make([]string, 0, len(props))
	for k := range props {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		si, sj := strings.HasPrefix(keys[i], "$."), strings.HasPrefix(keys[j], "$.")
		if si != sj {
			return si
		}
		return keys[i] < keys[j]
	})
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte('&')
		}
		b.WriteString(escape(k))
		b.WriteByte('=')
		b.WriteString(escape(props[k]))
	}
	return b.String()
}

// DecodeProperties reads a property bag: k=v pairs joined by '&', a name alone standing for
// a property without value. A trailing '/' (the C# SDK's habit) is not part of the last value.
func DecodeProperties(bag string) map[string]string {
	bag = strings.TrimSuffix(bag, "/")
	if bag == "" {
		return nil
	}
	props := make(map[string]string)
	for _, pair := range strings.Split(bag, "&") {
		if pair == "" {
			continue
		}
		k, v, _ := strings.Cut(pair, "=")
		props[unescape(k)] = unescape(v)
	}
	return props
}

// escape percent-encodes everything but RFC 3986's unreserved characters, so '$' becomes %24
// and a space %20, as the SDKs' decoders expect.
func escape(s string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
	return b.String()
}

// unescape decodes percent-encoding and keeps '+' as a plus (property bags are not form
// encoded); a malformed escape is kept as sent rather than losing the property.
func unescape(s string) string {
	if u, err := url.PathUnescape(s); err == nil {
		return u
	}
	return s
}
