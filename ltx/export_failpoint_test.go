package ltx

// SetFailpoint replaces the failpoint hook, for crash tests.
func SetFailpoint(fn func(name string)) { failpoint = fn }
