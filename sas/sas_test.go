package sas

import (
	"encoding/hex"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// The ESDK-C vectors (protocol.md §5.9, §7.1) take a precomputed signature, so they pin the
// string to sign and the token's layout; the HMAC itself is pinned by RFC 4231.
func TestVectors(t *testing.T) {
	const sig = "cS1eHM/lDjsRsrZV9508wOFrgmZk4g8FNg8NwHVSiSQ"
	t.Run("hub", func(t *testing.T) {
		got := format("myiothub.azure-devices.net/devices/my_device", sig, "1578941692", "")
		assert.Equal(t, "SharedAccessSignature sr=myiothub.azure-devices.net%2Fdevices%2Fmy_device&sig=cS1eHM%2FlDjsRsrZV9508wOFrgmZk4g8FNg8NwHVSiSQ&se=1578941692", got)
	})
	// ESDK-C writes DPS's escapes in lower case (%2f) and the other SDKs in upper case; both
	// services accept either, since percent-escapes are case-insensitive (RFC 3986 §2.1).
	t.Run("dps string to sign", func(t *testing.T) {
		got := stringToSign("0neFEEDC0DE/registrations/myRegistrationId", "1578941692")
		assert.True(t, strings.EqualFold("0neFEEDC0DE%2fregistrations%2fmyRegistrationId\n1578941692", got), got)
		assert.True(t, strings.HasPrefix(got, "0neFEEDC0DE%"), "the resource keeps its case")
	})
	t.Run("dps with key name", func(t *testing.T) {
		got := format("0neFEEDC0DE/registrations/myRegistrationId", sig, "1578941692", "iothubowner")
		want := "SharedAccessSignature sr=0neFEEDC0DE%2fregistrations%2fmyRegistrationId&sig=cS1eHM%2FlDjsRsrZV9508wOFrgmZk4g8FNg8NwHVSiSQ&se=1578941692&skn=iothubowner"
		assert.Equal(t, strings.ToLower(want), strings.ToLower(got))
		assert.Contains(t, got, "&sig=cS1eHM%2FlDjsRsrZV9508wOFrgmZk4g8FNg8NwHVSiSQ&", "the signature keeps its case")
	})
}

func TestTokenSignature(t *testing.T) {
	// RFC 4231 test case 2: HMAC-SHA256 with key "Jefe".
	const want = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
	assert.Equal(t, want, hex.EncodeToString(DeviceKey([]byte("Jefe"), "what do ya want for nothing?")))

	// The signature computed independently:
	// printf '0neFEEDC0DE%%2Fregistrations%%2FmyRegistrationId\n1578941692' | openssl dgst -sha256 -hmac Jefe -binary | base64
	const sig = "1zFYsJjUfNqSAz+izVGKOXkyrUKJeERgZre+Mi9rPaU="
	tok := Token([]byte("Jefe"), "0neFEEDC0DE/registrations/myRegistrationId", time.Unix(1578941692, 0), "registration")
	assert.Equal(t, "SharedAccessSignature sr=0neFEEDC0DE%2Fregistrations%2FmyRegistrationId&sig="+url.QueryEscape(sig)+"&se=1578941692&skn=registration", tok)
}
