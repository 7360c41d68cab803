/* A stand-in for Windows' bcryptprimitives.dll, which Wine 8 (Debian 12's) lacks and Rust's std
 * (1.78 and later) loads for its random numbers: ProcessPrng from RtlGenRandom. Only for running
 * bone-tool's Windows tests under Wine (scripts/cross-check.sh); Windows itself has the real one. */
#include <windows.h>
#include <ntsecapi.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG n = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!RtlGenRandom(data, n)) return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}
